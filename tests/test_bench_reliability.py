"""scripts/bench_reliability.py cannot rot: its checks tell right from wrong on real files and real subprocesses, and a
tiny subset of its cases runs end to end (real fixtures, real `distill` subprocesses)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


bench = _load("bench_reliability")


def test_clean_refusal_tells_a_traceback_from_a_one_line_error():
    py = sys.executable
    one_line = bench.run([py, "-c", "import sys; print('error: --x is 0; expected > 0', file=sys.stderr); sys.exit(2)"])
    assert bench.clean_refusal(one_line) == (True, "exit 2: error: --x is 0; expected > 0")
    crash = bench.run([py, "-c", "raise ValueError('boom')"])
    ok, detail = bench.clean_refusal(crash)
    assert not ok and crash.rc == 1 and "traceback" in detail and "ValueError: boom" in detail
    accepted = bench.run([py, "-c", "print('fine')"])
    assert bench.clean_refusal(accepted)[0] is False
    hung = bench.run([py, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert hung.rc is None and bench.clean_refusal(hung) == (False, "timeout: (no stderr)")


def test_dataset_comparison_finds_leftovers_and_changed_bytes_but_not_timing(tmp_path):
    ds = tmp_path / "ds"
    (ds / "shards").mkdir(parents=True)
    (ds / "shards" / "00000.arrow").write_bytes(b"\x00\x01\x02")
    manifest = {"format": "distill-logits", "created_by": {"sessions": [{"seconds": 1.5}]}, "totals": {"windows": 8}}
    (ds / "manifest.json").write_text(json.dumps(manifest))
    (ds / "README.md").write_text(f"distill precompute --out {ds}\n")
    reference = bench.dataset_files(ds)

    manifest["created_by"]["sessions"].append({"seconds": 0.7})  # a resumed capture: one more timing session
    (ds / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert bench.compare_datasets(reference, bench.dataset_files(ds)) == ""
    other = tmp_path / "other"  # the same dataset in another folder: the card quotes its own --out
    shutil.copytree(ds, other)
    (other / "README.md").write_text(f"distill precompute --out {other}\n")
    assert bench.compare_datasets(reference, bench.dataset_files(other)) == ""
    (other / "README.md").write_text(f"distill precompute --top-k 4 --out {other}\n")
    assert bench.compare_datasets(reference, bench.dataset_files(other)) == "differ: README.md"

    (ds / "_progress").mkdir()
    (ds / "manifest.json.tmp-123").write_text("{}")
    (ds / "shards" / "00000.arrow").write_bytes(b"\x00\x01\x03")
    diff = bench.compare_datasets(reference, bench.dataset_files(ds))
    assert diff == "leftovers: _progress, manifest.json.tmp-123; differ: shards/00000.arrow"


def test_tree_digest_sees_content_links_and_special_files(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = bench.tree_digest(tmp_path)
    (tmp_path / "a.txt").write_text("two")
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    after = bench.tree_digest(tmp_path)
    assert bench.digest_diff(before, after) == f"{tmp_path / 'a.txt'}, {tmp_path / 'link'}"
    assert after[str(tmp_path / "link")] == ("link", str(tmp_path / "a.txt"))


@pytest.mark.slow
def test_quick_subset_end_to_end(tmp_path):
    """Real fixtures, real subprocesses: bad inputs that the CLI refuses today are counted as passed, and the report
    holds one table per section with its counts."""
    report = tmp_path / "reliability.md"
    assert bench.main(["--quick", "--only", "R4", "--work", str(tmp_path / "work"), "--out", str(report)]) == 0
    text = report.read_text()
    assert "| R4 | bad inputs: one-line error, exit != 0, no traceback, nothing existing changed | 4/4 |" in text
    assert "| precompute --data is a zero-byte .jsonl | pass | exit 2: error: --data " in text
