"""Sampled targets and the compact encoding through real captures: decode agreement, the independent reader of
docs/FORMAT.md, and byte-identical resume with sampling on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset, verify_dataset
from pipeline.precompute import precompute

from .test_format_doc import DOC

T, K, N = 16, 8, 12


def capture(teacher, data, out, **kw):
    cfg = dict(teacher=str(teacher), data=[str(data)], out=str(out), seq_len=T, top_k=K, batch_size=4, shard_size=5,
               max_tokens=400, progress=False, samples=N)
    cfg.update(kw)
    return precompute(PrecomputeConfig(**cfg))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, teacher_dir, corpus_dir):
    base = tmp_path_factory.mktemp("enc")
    exact = capture(teacher_dir, corpus_dir, base / "exact", targets="both")
    compact = capture(teacher_dir, corpus_dir, base / "compact", targets="both", encoding="compact")
    return base / "exact", base / "compact", exact, compact


def test_compact_decodes_to_the_exact_targets(pair):
    exact, compact, _, m = pair
    assert m["capture"]["id_bits"] == 9 and m["capture"]["count_bits"] == 4  # vocab 320, N 12
    a, b = open_dataset(exact), open_dataset(compact)
    assert m["capture"]["topk_id_coding"] == "sorted_expgolomb"
    swapped = total = 0
    for sa, sb in zip(a.shards, b.shards):
        ia, la = sa.sparse_targets("topk")
        ib, lb = sb.sparse_targets("topk")
        # the same ids, each with its exact log-prob within half a quantization step
        by_a, by_b = np.argsort(ia, -1), np.argsort(ib, -1)
        np.testing.assert_array_equal(np.take_along_axis(ia, by_a, -1), np.take_along_axis(ib, by_b, -1))
        step = (la[..., :1] - la[..., -1:]) / ((1 << m["capture"]["logprob_bits"]) - 1)
        assert (np.abs(np.take_along_axis(la, by_a, -1) - np.take_along_axis(lb, by_b, -1)) <= np.abs(step) / 2 + 2e-3).all()
        # in rank order, most probable first; the teacher's order but among equal quantized values (ascending id there)
        assert (lb[..., 1:] <= lb[..., :-1]).all()
        slot = np.argmax(ib[..., None, :] == ia[..., :, None], -1)  # (R, T, K): where ia's id sits in ib
        lb_of_a = np.take_along_axis(lb, slot, -1)  # the compact log-prob of the exact rank-j id
        moved = ia != ib
        assert (lb_of_a[moved] == lb[moved]).all()
        ties = (lb[..., 1:] == lb[..., :-1]) & (ib[..., 1:] < ib[..., :-1])
        assert not ties.any()  # equal values come back in ascending id order
        swapped, total = swapped + int(moved.sum()), total + moved.size
        # sampled targets are the same draws in both encodings
        for x, y in zip(sa.sparse_targets("sampled"), sb.sparse_targets("sampled")):
            np.testing.assert_array_equal(x, y)
    assert swapped < 0.1 * total  # only ties move


def test_every_position_trained_keeps_format_1s_layout_and_bytes(pair, tmp_path, teacher_dir, corpus_dir):
    """400 positions of one long text in 25 full windows: every position is trained, so targets are stored at every
    position as in format 1 (fixed-size columns, no `positions` key); the same text with padding (a window not filled)
    stores none at the padding (list columns: their offsets cost about what 5 padding positions save)."""
    exact, _, m, _ = pair
    assert "positions" not in m["capture"] and m["totals"]["valid_tokens"] == m["totals"]["tokens"] == 400
    assert m["schema"]["target_logprob"] == f"fixed_size_list<item: float>[{T}]"
    assert m["schema"]["topk_ids"] == f"fixed_size_list<item: fixed_size_list<item: uint16>[{K}]>[{T}]"
    padded = capture(teacher_dir, corpus_dir, tmp_path / "padded", targets="both", max_tokens=395)
    assert padded["capture"]["positions"] == "trained" and padded["totals"]["windows"] == 25
    assert padded["schema"]["target_logprob"] == "list<item: float>"
    assert padded["totals"]["valid_tokens"] == 395
    arrow = lambda man: sum(f["bytes"] for r in man["shards"] for rel, f in r["files"].items() if rel.endswith(".arrow"))
    assert abs(arrow(padded) - arrow(m)) < 0.02 * arrow(m)
    assert sum(int(s.stored_counts("topk_ids").sum()) for s in open_dataset(tmp_path / "padded").shards) == 395
    a, b = open_dataset(exact), open_dataset(tmp_path / "padded")
    for sa, sb in zip(a.shards, b.shards):  # the same teacher on the same windows: equal where both store targets
        keep = sb.stored_mask()
        for kind in ("topk", "sampled"):
            for x, y in zip(sa.sparse_targets(kind), sb.sparse_targets(kind)):
                np.testing.assert_array_equal(x[keep], y[keep])


def test_sampled_targets_are_consistent(pair):
    exact, _, m, _ = pair
    ds = open_dataset(exact)
    for shard in ds.shards:
        ids, lp = shard.sparse_targets("sampled")
        counts = np.rint(np.exp(lp.astype(np.float64)) * N)
        assert (counts.sum(-1) == N).all()
        n = shard.column("sample_n")
        assert ((np.isfinite(lp)).sum(-1) == n).all()
    assert 1 <= m["totals"]["sample_unique_mean"] <= N
    assert 0 < m["totals"]["sample_mass_mean"] <= 1.0001
    verify_dataset(exact)


def test_compact_is_smaller_and_its_fidelity_is_recorded(pair):
    _, _, me, mc = pair
    assert mc["totals"]["bytes_per_token"] < me["totals"]["bytes_per_token"]
    assert mc["totals"]["recon_kl_mean"] - me["totals"]["recon_kl_mean"] < 1e-3
    for rec in mc["shards"]:
        assert {"topk_mass", "recon_kl", "sample_unique", "sample_mass", "sample_rkl"} <= set(rec["stats"])


@pytest.mark.parametrize("packing", [True, False])
def test_independent_reader_from_format_doc_decodes_a_compact_shard(pair, packing, tmp_path, teacher_dir, corpus_dir):
    compact = pair[1]
    if not packing:  # short texts, one per window: padding (loss_mask 0, no targets stored) in every window
        short = tmp_path / "short"
        short.mkdir()
        for i in range(7):
            (short / f"{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 3))
        compact = tmp_path / "unpacked"
        capture(teacher_dir, short, compact, targets="both", encoding="compact", packing=False)
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "unpack(" in b)
    scope: dict = {}
    exec(block.replace('root = "DATASET"', f'root = "{compact}"'), scope)
    shard = open_dataset(compact).shards[0]
    stored = shard.stored_mask()
    assert stored.any()
    assert packing or shard.dataset.capture.positions == "trained" and not stored.all()
    ids, lp = shard.sparse_targets("topk")
    np.testing.assert_array_equal(scope["topk_ids"][stored], ids[stored])
    np.testing.assert_allclose(scope["topk_logprobs"][stored], lp[stored], atol=1e-6)
    sids, slp = shard.sparse_targets("sampled")
    for w, positions in enumerate(scope["samples"]):
        for t, (pid, pc) in enumerate(positions):
            assert len(pid) == (int(shard.column("sample_n")[w, t]) if stored[w, t] else 0)
            np.testing.assert_array_equal(pid, sids[w, t, : len(pid)])
            np.testing.assert_allclose(np.log(pc / N), slp[w, t, : len(pc)], atol=1e-6)


def test_zstd_compression_round_trips(tmp_path, teacher_dir, corpus_dir):
    m = capture(teacher_dir, corpus_dir, tmp_path / "z", compression="zstd")
    ref = capture(teacher_dir, corpus_dir, tmp_path / "plain")
    a, b = open_dataset(tmp_path / "z"), open_dataset(tmp_path / "plain")
    np.testing.assert_array_equal(a.shards[0].column("topk_logprobs"), b.shards[0].column("topk_logprobs"))
    assert m["capture"]["compression"] == "zstd" and m["totals"]["bytes"] != ref["totals"]["bytes"]
    import datasets

    assert len(datasets.Dataset.from_file(str(tmp_path / "z" / "shards" / "00000.arrow"))) == a.shards[0].windows


@pytest.mark.slow
def test_resume_with_sampling_is_byte_identical(tmp_path, teacher_dir, corpus_dir):
    def cmd(out):
        return [sys.executable, "-m", "pipeline.cli", "precompute", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
                "--out", str(out), "--seq-len", "32", "--targets", "both", "--samples", "16", "--encoding", "compact",
                "--top-k", "8", "--batch-size", "2", "--shard-size", "2", "--max-tokens", "3000", "--no-progress", "--device", "cpu"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd(tmp_path / "ref"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "_progress").glob("shard-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    subprocess.run(cmd(out), check=True, env=env, capture_output=True)
    files = lambda root: {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}
    assert files(out) == files(tmp_path / "ref")
    assert json.loads((out / "manifest.json").read_text())["capture"]["targets"] == ["topk", "sampled"]


def test_verify_accepts_every_real_kind_of_dataset(pair, tmp_path, teacher_dir, corpus_dir):
    """verify's value checks hold on real captures of each kind (no false alarm): both target kinds in both encodings,
    sampling at a temperature (importance weights), zstd."""
    exact, compact, _, _ = pair
    verify_dataset(exact)
    verify_dataset(compact)
    capture(teacher_dir, corpus_dir, tmp_path / "tempered", targets="sampled", sample_temperature=1.5, encoding="compact")
    verify_dataset(tmp_path / "tempered")
    capture(teacher_dir, corpus_dir, tmp_path / "z", compression="zstd", hidden_layers=[-1])
    verify_dataset(tmp_path / "z")


def test_verify_catches_a_crafted_compact_blob(pair, tmp_path):
    """A compact top-k blob one byte short, re-signed so the checksums match, is named by verify (more crafted id blobs
    in test_idcode.py)."""
    import hashlib
    import shutil

    import pyarrow as pa

    from pipeline.common.errors import FormatError

    ds = tmp_path / "ds"
    shutil.copytree(pair[1], ds)
    path = ds / "shards" / "00000.arrow"
    table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()
    i = table.schema.get_field_index("topk_ids_packed")
    blobs = table.column(i).to_pylist()
    blobs[1] = blobs[1][:-1]
    table = table.set_column(i, table.schema.field(i), pa.array(blobs, pa.binary()))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    m = json.loads((ds / "manifest.json").read_text())
    data = path.read_bytes()
    m["shards"][0]["files"]["00000.arrow"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    m["shards"][0]["bytes"] = sum(f["bytes"] for f in m["shards"][0]["files"].values())
    m["totals"]["bytes"] = sum(r["bytes"] for r in m["shards"])
    m["totals"]["bytes_per_token"] = m["totals"]["bytes"] / m["totals"]["valid_tokens"]
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"00000.arrow: column topk_ids_packed: window 1: suffix section of \d+ bytes, expected"):
        verify_dataset(ds)
