"""A real `distill precompute` process killed with SIGKILL mid-run and rerun ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def cmd(teacher, data, out):
    return [sys.executable, "-m", "pipeline.cli", "precompute", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--seq-len", "32", "--top-k", "8", "--batch-size", "2", "--shard-size", "2", "--hidden-layers", "-1",
            "--max-tokens", "3000", "--no-progress", "--device", "cpu"]


def shard_files(out: Path) -> dict[str, bytes]:
    root = out / "shards"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sigkill_and_resume_is_byte_identical(tmp_path, teacher_dir, corpus_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    subprocess.run(cmd(teacher_dir, corpus_dir, ref), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(teacher_dir, corpus_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "_progress").glob("shard-*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "_progress").glob("shard-*.json")))
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed; make it longer"
    assert done_before >= 3
    first = out / "shards" / "00000.arrow"
    stamp = first.stat().st_mtime_ns

    r = subprocess.run(cmd(teacher_dir, corpus_dir, out), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists()
    assert shard_files(out) == shard_files(ref)
    assert first.stat().st_mtime_ns == stamp, "a finished shard was recomputed instead of skipped"
    assert not list((out / "shards").glob("*.tmp-*"))


def test_two_concurrent_ranks_equal_one_process(tmp_path, teacher_dir, corpus_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(cmd(teacher_dir, corpus_dir, one), check=True, env=env, capture_output=True)
    procs = [subprocess.Popen(cmd(teacher_dir, corpus_dir, two) + ["--rank", str(r), "--world-size", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()[-2000:]
    assert (two / "manifest.json").exists() and not (two / "_progress").exists()
    assert shard_files(two) == shard_files(one)
