"""Compact top-64: bytes per token, reconstruction KL and reader speed of the entropy-coded ids (issue 13), with
DistillKit's logprob compressor on the same teacher logits.

    python scripts/bench_compact.py --teacher .cache/teacher-7d178d81f8b0 [--corpus .cache/corpus] [--tokens 32768]
        [--distillkit /work/scratch/distillkit]

Captures `--tokens` held-out tokens (`heldout.jsonl`, seq 512, as P4 of bench_capture.py) with top-64 in the `exact`
and the `compact` encoding, and rewrites a copy of the compact dataset in the id layout before `topk_id_coding`
existed ("packed": 13-bit ids in rank order), so the three differ only in how targets are stored. Then it runs the
teacher again on the stored windows and measures, at every stored position, KL(teacher ‖ reconstruction) with the
reconstruction of P4 (the decoded head plus the tail mass spread evenly over the other ids) for each dataset and for
DistillKit's `LogprobCompressor` configurations (its code imported from `--distillkit`, a checkout outside this
repository; its rows are skipped without it) on the same float32 log-probs. Bytes: on disk per valid token for our
datasets, and the target bytes alone (ids and log-probs: compact blobs + hi/lo, or DistillKit's two byte vectors)
for every row. P5: `WindowReader` tokens/s at batch 16 for each of our datasets (the trainer's reader, decode included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import PrecomputeConfig  # noqa: E402
from pipeline.format import open_dataset  # noqa: E402
from pipeline.format.bitpack import pack_bits  # noqa: E402
from pipeline.precompute import precompute  # noqa: E402

K = 64
# DistillKit configurations (README: "budget pick" and "recommended"), at k = 64 and at a k that lands near our size.
DISTILLKIT = {
    "budget pick (k=50, as published)": dict(k=50, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"]),
    "budget pick at k=64": dict(k=64, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"]),
    "recommended at k=40": dict(k=40, exact_k=16, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, 3, 4, "sqrt"]),
    "recommended at k=64": dict(k=64, exact_k=16, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, 3, 4, "sqrt"]),
    "k=64, exact 1 + poly + 4-bit residuals": dict(k=64, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, "sqrt"],
                                                   residual_bins=[dict(scale_dtype="float16", element_bits=4, num_elements=63)]),
    "k=64, all exact bf16": dict(k=64, exact_k=64, exact_dtype="bfloat16"),
}


def capture(a, out: Path, **kw) -> dict:
    if out.exists():
        shutil.rmtree(out)
    return precompute(PrecomputeConfig(teacher=a.teacher, data=[str(Path(a.corpus) / "heldout.jsonl")], out=str(out),
                                       seq_len=a.seq_len, batch_size=8, shard_size=64, max_tokens=a.tokens, top_k=K,
                                       device="cpu", dtype="float32", progress=False, **kw))


def to_packed(src: Path, dst: Path) -> None:
    """A copy of a compact dataset with its top-k ids packed at id_bits in rank order (the layout before
    topk_id_coding), q in that order; manifest without the key, re-signed."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    cap = m["capture"]
    L = (1 << cap["logprob_bits"]) - 1
    for shard in open_dataset(src).shards:
        path = dst / "shards" / f"{shard.name}.arrow"
        table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()
        ids, lp = shard.sparse_targets("topk")
        stored = shard.stored_mask()
        hi, lo = shard.column("topk_logprob_hi").astype(np.float32), shard.column("topk_logprob_lo").astype(np.float32)
        lp = np.where(stored[..., None], lp, hi[..., None])
        q = np.rint((lp - hi[..., None]) / np.where(lo < hi, lo - hi, 1)[..., None] * L).astype(np.int64)
        for name, values, bits in (("topk_ids_packed", ids, cap["id_bits"]), ("topk_logprobs_packed", q, cap["logprob_bits"])):
            i = table.schema.get_field_index(name)
            blobs = [pack_bits(values[w][stored[w]], bits) for w in range(len(ids))]
            table = table.set_column(i, table.schema.field(i), pa.array(blobs, pa.binary()))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    del cap["topk_id_coding"]
    for rec in m["shards"]:  # re-signed, so the reader opens it
        for rel, meta in rec["files"].items():
            data = (dst / "shards" / rel).read_bytes()
            meta |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        rec["bytes"] = sum(f["bytes"] for f in rec["files"].values())
    m["totals"]["bytes"] = sum(r["bytes"] for r in m["shards"])
    m["totals"]["bytes_per_token"] = m["totals"]["bytes"] / m["totals"]["valid_tokens"]
    (dst / "manifest.json").write_text(json.dumps(m))


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "shards").iterdir())


def target_bytes(path: Path) -> int:
    """Bytes of the stored top-k alone: compact blobs + hi/lo (float16 each), or ids + log-probs of exact."""
    total = 0
    for shard in open_dataset(path).shards:
        names = [n for n in shard.table.column_names if n.startswith("topk_")]
        for n in names:
            col = shard.table.column(n).combine_chunks()
            total += sum(b.size for b in col.buffers()[2:] if b is not None) if pa.types.is_binary(col.type) else \
                col.flatten().nbytes if pa.types.is_list(col.type) else col.nbytes
    return total


def recon_kl(lp: torch.Tensor, ids: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ r) per position, r = exp(head) at ids + (1 - its sum) spread over the other V - k ids (P4's reading).
    lp (N, V) float32 full log-probs; ids (N, k) int64; head (N, k) decoded log-probs."""
    V, k = lp.shape[-1], ids.shape[-1]
    head = head.float()
    p = lp.exp()
    tail_mass = (1.0 - head.exp().sum(-1)).clamp_min(1e-12)
    log_r_tail = tail_mass.log() - math.log(V - k)  # (N,)
    terms = torch.where(p > 0, p * (lp - log_r_tail[:, None]), 0.0)  # (N, V) as if every id were in the tail
    p_head, lp_head = p.gather(-1, ids), lp.gather(-1, ids)
    fix = torch.where(p_head > 0, p_head * (lp_head - head), 0.0) - terms.gather(-1, ids)
    return terms.sum(-1) + fix.sum(-1)


def distillkit_compressors(path: str | None, vocab: int) -> dict:
    """name -> DistillKit LogprobCompressor of each DISTILLKIT configuration (no delta encoding, no error diffusion, as
    in its README's configurations); empty without a checkout."""
    if not path:
        return {}
    sys.path.insert(0, path)
    from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor

    out = {}
    for name, c in DISTILLKIT.items():
        c = dict(c, d=vocab, delta_encoding=False, error_diffusion=False, term_dtype="float32")
        c.setdefault("residual_bins", [])
        out[name] = LogprobCompressor(config=DistributionQuantizationConfig(**c))
    return out


def fidelity(a, datasets: dict[str, Path]) -> tuple[dict, dict]:
    """Mean KL per row over every stored position, and DistillKit's bytes per token."""
    from pipeline.teacher import load_teacher

    model = load_teacher(a.teacher, None, torch.float32, torch.device("cpu"), False)
    dk = distillkit_compressors(a.distillkit, model.config.vocab_size)
    opened = {name: open_dataset(p) for name, p in datasets.items()}
    sums = {name: 0.0 for name in list(datasets) + list(dk)}
    dk_bytes = {name: 0 for name in dk}
    n = 0
    ref = opened[next(iter(opened))]
    for s, shard in enumerate(ref.shards):
        decoded = {name: ds.shards[s].sparse_targets("topk") for name, ds in opened.items()}
        stored = shard.stored_mask()
        inputs = shard.column("input_ids").astype(np.int64)
        positions = shard.column("position_ids").astype(np.int64)
        for b in range(0, len(inputs), 4):
            with torch.inference_mode():
                logits = model(input_ids=torch.from_numpy(inputs[b : b + 4]),
                               position_ids=torch.from_numpy(positions[b : b + 4]), use_cache=False).logits
            keep = torch.from_numpy(stored[b : b + 4])
            lp = logits.float().log_softmax(-1)[keep]  # (N, V)
            n += len(lp)
            for name, (ids, dlp) in decoded.items():
                ids_t, lp_t = torch.from_numpy(ids[b : b + 4])[keep], torch.from_numpy(dlp[b : b + 4])[keep]
                sums[name] += float(recon_kl(lp, ids_t, lp_t).sum())
            top_lp, top_ids = lp.topk(K, -1)
            for name, comp in dk.items():
                kk = comp.config.k
                row = comp.compress_from_sparse(top_ids[:, :kk], top_lp[:, :kk])
                dk_bytes[name] += row["compressed_logprobs"].shape[-1] * len(lp) + row["bytepacked_indices"].shape[-1] * len(lp)
                ids_d, lp_d = comp.decompress_to_sparse(row)
                sums[name] += float(recon_kl(lp, ids_d.long(), lp_d.float()).sum())
    return {name: v / n for name, v in sums.items()}, {name: v / n for name, v in dk_bytes.items()}


def reader_speed(path: Path, batch_size: int = 16, batches: int = 60) -> float:
    """Tokens/s of the trainer's reader alone (decode + tensors), as scripts/bench_train.py measures P5."""
    from trainer.data import WindowReader

    it = iter(WindowReader(str(path), batch_size, seed=0, targets="topk"))
    next(it)
    t0 = time.perf_counter()
    tokens = sum(next(it)["input_ids"].numel() for _ in range(batches))
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--corpus", default=".cache/corpus")
    ap.add_argument("--work", default=".cache/bench-compact")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--distillkit", default=None, help="a DistillKit checkout (its distillkit/ package), for its rows")
    ap.add_argument("--student-tok-s", type=float, default=6000.0, help="P5: the student's training tokens/s")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    exact, compact = work / "exact", work / "compact"
    me, mc = capture(a, exact), capture(a, compact, encoding="compact")
    packed = work / "compact-packed"
    to_packed(compact, packed)
    datasets = {"exact top-64 (float16)": exact, "compact top-64, ids packed (before)": packed,
                "compact top-64, ids sorted_expgolomb (now)": compact}
    valid = me["totals"]["valid_tokens"]
    kl, dk_bytes = fidelity(a, datasets)
    speeds = {name: 0.0 for name in datasets}
    for _ in range(3):  # best of 3, the datasets interleaved: the machine's other load moves single runs
        for name, p in datasets.items():
            speeds[name] = max(speeds[name], reader_speed(p))
    print(f"load average during the run: {os.getloadavg()[0]:.1f}")
    print(f"{valid} valid tokens, seq {a.seq_len}; manifest recon_kl (1 in 8 positions): exact "
          f"{me['totals']['recon_kl_mean']:.4f}, compact {mc['totals']['recon_kl_mean']:.4f}")
    print("| stored | bytes/token on disk | target bytes/token | KL(teacher ‖ reconstruction) | Δ KL vs exact | "
          f"reader tok/s (batch 16) | ÷ student ({a.student_tok_s:,.0f} tok/s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = kl["exact top-64 (float16)"]
    rows = {}
    for name, p in datasets.items():
        rows[name] = dict(disk=disk_bytes(p) / valid, target=target_bytes(p) / valid, kl=kl[name], reader=speeds[name])
        r = rows[name]
        print(f"| {name} | {r['disk']:.1f} | {r['target']:.1f} | {r['kl']:.4f} | {r['kl'] - base:+.4f} | "
              f"{r['reader']:,.0f} | {r['reader'] / a.student_tok_s:.0f}× |")
    for name, b in dk_bytes.items():
        rows["DistillKit " + name] = dict(target=b, kl=kl[name])
        print(f"| DistillKit: {name} | – | {b:.1f} | {kl[name]:.4f} | {kl[name] - base:+.4f} | – | – |")
    (work / "result.json").write_text(json.dumps({"valid_tokens": valid, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
