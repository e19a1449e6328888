"""`pip install .` works: the wheel holds every module of the source tree, installs into a fresh virtual environment, and
runs precompute → train → eval from a folder outside the checkout.

What proves it: the wheel is built from a copy of the project files (so no stale `build/` or the checkout's editable
install can fill gaps), its file list must equal the source tree's modules, and the commands run with a working
directory outside the repository, where `import pipeline` can only find the installed wheel (asserted). To stay fast
and offline, the wheel is installed with `--no-deps` and the new environment reaches the already-installed
dependencies (torch 2.13.0 and the rest) through a plain path entry to the test environment's site-packages; such an
entry does not run the `.pth` hooks there, so the editable install of the checkout stays invisible. That the declared
dependencies and Python floor agree with the environment the suite runs in is checked from the wheel's metadata.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "trainer")


def source_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src)], check=True, capture_output=True)
    (found,) = dist.glob("*.whl")
    return found


def test_wheel_holds_every_module_and_true_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    modules = {n for n in names if n.endswith(".py")}
    assert modules == source_modules()
    assert {"pipeline/format/reader.py", "trainer/losses/fused.py"} <= modules
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from importlib.metadata import metadata, version

    floor = SpecifierSet(meta["Requires-Python"])
    assert floor == SpecifierSet(">=3.11") and sys.version_info[:2] >= (3, 11)
    # every dependency installed here accepts the declared floor: zarr 3 (among others) refuses 3.10
    assert "3.10" not in SpecifierSet(metadata("zarr")["Requires-Python"])
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is None:  # the dev extra is not installed in every environment
            assert version(req.name) in req.specifier, f"{req} but {version(req.name)} is installed"


def test_installed_wheel_runs_precompute_train_eval_outside_the_repo(wheel, tmp_path, teacher_dir, corpus_dir):
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"  # not inside the checkout: nothing of the repository is on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def run(*args):
        r = subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    where = run(python, "-c", "import pipeline.format, trainer.losses; print(pipeline.format.__file__)").stdout
    assert where.startswith(site) and str(REPO) not in where
    distill = env_dir / "bin" / "distill"
    run(distill, "precompute", "--teacher", teacher_dir, "--data", corpus_dir, "--out", "ds", "--seq-len", 16,
        "--top-k", 4, "--max-tokens", 512, "--no-progress")
    (work / "student.json").write_text((teacher_dir / "config.json").read_text())
    run(distill, "train", "--data", "ds", "--student-config", "student.json", "--out", "run", "--steps", 2,
        "--warmup", 1, "--batch-size", 4, "--device", "cpu", "--no-progress")
    out = run(distill, "eval", "--student", "run", "--data", "ds", "--device", "cpu", "--json").stdout
    import json

    assert json.loads(out)["tokens"] == 512  # every captured token is scored
