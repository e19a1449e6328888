"""The seams between the parts: the format imports no torch, and the stages meet only at the format and the shared module.

Stage two (`trainer/`) may import from `pipeline/` only `pipeline.format` and `pipeline.common`; stage one imports nothing
from `trainer/`; the format imports nothing of either stage but `pipeline.common`; the shared module imports no stage
(the `distill` group finds the stages' commands by import string).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved against its package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{a.name}" if not node.module else module) for a in node.names]
    return found


def offending(folder: str, allowed, forbidden_roots) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in imports_of(path):
            if name.split(".")[0] in forbidden_roots and not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_trainer_imports_only_the_format_and_the_shared_module_from_pipeline():
    assert offending("trainer", ("pipeline.format", "pipeline.common"), {"pipeline"}) == []


def test_pipeline_imports_nothing_from_trainer():
    assert offending("pipeline", (), {"trainer"}) == []


def test_format_and_shared_module_import_no_stage():
    assert offending("pipeline/format", ("pipeline.format", "pipeline.common"), {"pipeline", "trainer"}) == []
    assert offending("pipeline/common", ("pipeline.common",), {"pipeline", "trainer"}) == []


def test_the_seam_test_sees_a_forbidden_import():
    """The checker itself: a trainer module importing a stage-one module is reported, a format import is not."""
    fake = ROOT / "trainer" / "_seam_probe_tmp.py"
    fake.write_text("from pipeline.teacher import load_teacher\nfrom pipeline.format import open_dataset\n")
    try:
        assert offending("trainer", ("pipeline.format", "pipeline.common"), {"pipeline"}) == [
            "trainer/_seam_probe_tmp.py:1 imports pipeline.teacher"]
    finally:
        fake.unlink()


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError(f'{name} is not importable in this test')
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("code", [
    "import pipeline.format, pipeline.format.verify, pipeline.format.sections, pipeline.format.tokenizer_id",
    "import pipeline.common.cli, pipeline.common.errors, pipeline.common.files, pipeline.common.outdir",
    "from pipeline.common.cli import main; main(['--help'], standalone_mode=False)",
    "from pipeline.common.cli import main; main(['train', '--help'], standalone_mode=False)",
])
def test_light_imports_without_torch(code):
    """The format, the shared module and `distill --help` work where torch cannot be imported at all."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_torch_blocker_works():
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import torch"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "not importable in this test" in r.stderr
