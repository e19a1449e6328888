"""`--tp N` (pipeline/tensor_parallel.py) under a real torchrun on CPU (gloo): the teacher is split by transformers'
tensor-parallel plan across N processes and captures what one process captures; with 2N processes the two groups are
data-parallel replicas (one writer each) and give the same dataset, also when killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common.errors import UserError
from pipeline.config import PrecomputeConfig
from pipeline.format.reader import open_dataset
from pipeline.precompute import precompute

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
LOGPROB_TOL = 2e-3  # float32 sums in another order (all-reduce of partial products), then fp16 storage


def args(teacher, data, out) -> list[str]:
    return ["precompute", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--seq-len", "32", "--top-k", "8",
            "--batch-size", "2", "--shard-size", "2", "--hidden-layers", "-1", "--max-tokens", "900", "--no-progress",
            "--device", "cpu", "--targets", "both", "--samples", "8", "--head-chunk", "24"]


def env(gpus: bool = False) -> dict:
    """The CPU runs hide any GPU: transformers splits a tensor-parallel teacher over the machine's accelerator."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **({} if gpus else {"CUDA_VISIBLE_DEVICES": ""}))


def torchrun(n: int, teacher, data, out, tp: int = 2) -> list[str]:
    with socket.socket() as s:  # a free port: tests may run next to other torchrun jobs
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "pipeline.cli"] + args(teacher, data, out) + ["--tp", str(tp)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    """The single-process capture (in this process: the same code path as the CLI's, one interpreter start less)."""
    out = tmp_path_factory.mktemp("tp") / "one"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=32, top_k=8, batch_size=2,
                                shard_size=2, hidden_layers=[-1], max_tokens=900, progress=False, device="cpu", targets="both",
                                samples=8, head_chunk=24))
    return out


def assert_same_dataset(got: Path, ref: Path) -> None:
    """Same windows and inputs exactly; log-probs within float tolerance; top-k ids equal wherever the neighbouring
    log-probs are not (near-)ties; sampled draws (same seeded uniforms, probabilities a rounding apart) equal but for
    a draw that falls at a boundary."""
    a, b = open_dataset(str(got)), open_dataset(str(ref))
    assert a.windows == b.windows and len(a.manifest.shards) == len(b.manifest.shards) >= 6
    ma, mb = json.loads((got / "manifest.json").read_text()), json.loads((ref / "manifest.json").read_text())
    assert ma["teacher"] == mb["teacher"] and ma["settings"] == mb["settings"] and ma["corpus"] == mb["corpus"]
    assert not (got / "_progress").exists()
    compared = same_draws = positions = 0
    for i in range(len(a.manifest.shards)):
        sa, sb = a.open_shard(i), b.open_shard(i)
        for name in ("window_index", "input_ids", "labels", "loss_mask", "position_ids"):
            assert np.array_equal(sa.column(name), sb.column(name)), (i, name)
        np.testing.assert_allclose(sa.column("target_logprob"), sb.column("target_logprob"), atol=LOGPROB_TOL)
        ids_a, lp_a = sa.sparse_targets("topk")  # (R, T, K)
        ids_b, lp_b = sb.sparse_targets("topk")
        np.testing.assert_allclose(lp_a, lp_b, atol=LOGPROB_TOL)
        with np.errstate(invalid="ignore"):  # -inf - -inf at padded positions: nan, not a clear gap
            gaps = np.diff(lp_b, axis=-1)  # (R, T, K-1), <= 0: a near-zero gap is a tie whose order may flip
        clear = np.ones(ids_b.shape, bool)
        clear[..., :-1] &= gaps < -LOGPROB_TOL
        clear[..., 1:] &= gaps < -LOGPROB_TOL
        assert np.array_equal(ids_a[clear], ids_b[clear]), i
        compared += int(clear.sum())
        draws_a, draws_b = sa.sparse_targets("sampled")[0], sb.sparse_targets("sampled")[0]  # (R, T, S) ids, padded
        same_draws += int((draws_a == draws_b).all(-1).sum())
        positions += draws_a.shape[0] * draws_a.shape[1]
        layer = a.hidden_layers[0]
        np.testing.assert_allclose(sa.hidden(layer)[:], sb.hidden(layer)[:], atol=2e-2)
    assert compared > 0.9 * a.windows * 32 * 8  # the tie rule spared few positions
    assert same_draws >= 0.99 * positions, (same_draws, positions)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int]) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_tp2_two_processes_equal_one_process(tmp_path, reference, teacher_dir, corpus_dir):
    out = tmp_path / "tp2"
    done = subprocess.run(torchrun(2, teacher_dir, corpus_dir, out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    share = re.search(r"--tp 2: ranks 0-1 hold the teacher \(group 0 of 1\); each holds (\d+)% of its", done.stderr)
    assert share and 40 <= int(share[1]) <= 75, done.stderr[-2000:]  # really split: attention, MLP, embeddings and head
    assert_same_dataset(out, reference)
    sessions = json.loads((out / "manifest.json").read_text())["created_by"]["sessions"]
    assert [(s["rank"], s["world_size"]) for s in sessions] == [(0, 1)]  # one writer: the group captured as one rank


def test_tp2_two_groups_killed_and_resumed_equal_one_process(tmp_path, reference, teacher_dir, corpus_dir):
    out = tmp_path / "tp2x2"
    proc = subprocess.Popen(torchrun(4, teacher_dir, corpus_dir, out), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while time.time() < deadline and len(list((out / "_progress").glob("shard-*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    workers = children(proc.pid)  # torchrun starts each worker in a session of its own: kill them by pid, all at once
    assert len(workers) == 4
    for pid in [proc.pid] + workers:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    wait_gone(workers)
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed; make it longer"
    marked = {p.name: p.stat().st_mtime_ns for p in (out / "_progress").glob("shard-*.json")}
    assert len(marked) >= 2

    done = subprocess.run(torchrun(4, teacher_dir, corpus_dir, out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_dataset(out, reference)
    sessions = json.loads((out / "manifest.json").read_text())["created_by"]["sessions"]
    assert sorted({(s["rank"], s["world_size"]) for s in sessions}) == [(0, 2), (1, 2)]  # two writers, groups 0 and 1
    assert not list((out / "shards").glob("*.tmp-*"))


def test_tp_outside_torchrun_is_refused_in_one_line(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(tmp_path / "o"), seq_len=32, tp=2, rank=0,
                           world_size=2, progress=False, device="cpu")
    with pytest.raises(UserError, match=r"--tp 2 splits the teacher across processes started by torchrun \(it sets MASTER_ADDR"):
        precompute(cfg)
    assert not (tmp_path / "o").exists()  # refused before writing anything


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: --tp 2 over NCCL")
def test_tp2_on_two_gpus_equals_one_gpu(tmp_path, teacher_dir, corpus_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    gpu = lambda cmd: [c if c != "cpu" else "cuda" for c in cmd] + ["--dtype", "float32"]  # TF32 is off by default
    done = subprocess.run(gpu([sys.executable, "-m", "pipeline.cli"] + args(teacher_dir, corpus_dir, one)), cwd=REPO, env=env(gpus=True),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(gpu(torchrun(2, teacher_dir, corpus_dir, two)), cwd=REPO, env=env(gpus=True), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_dataset(two, one)
