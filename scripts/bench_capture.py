"""Benchmarks of stage one, side by side in one run: P1 capture efficiency and P4 storage and fidelity.

    python scripts/bench_capture.py --teacher TEACHER_DIR [--corpus .cache/corpus] [--tokens 32768] [--quick]

P1: `precompute()` tokens/s (its capture loop: forward, targets, background writing, checksums; as recorded in the
manifest) ÷ a bare loop doing only the teacher forward plus log-softmax/top-k on the same windows, dtype and device,
and ÷ the bare forward alone. P4: bytes per valid token on disk, mean stored top-k mass and mean KL(teacher ‖ stored
reconstruction) on held-out text for k = 8, 32, 64 with and without one hidden layer, plus the sampled and compact
encodings (issue 6). `run(args)` returns rows; `markdown(rows)` renders them (scripts/benchmark.py calls both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import PrecomputeConfig
from pipeline.corpus import CorpusStats, count_windows, iter_documents, list_data_files, make_windows, tokenize_to_file
from pipeline.precompute import precompute


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--corpus", default=str(REPO / ".cache" / "corpus"))
    p.add_argument("--tokens", type=int, default=32768, help="held-out tokens per capture")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2, help="P1: best of this many runs of each side")
    p.add_argument("--sections", nargs="+", default=["p1", "p4"], choices=["p1", "p4"])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.repeats = 4096, 1
    return a


def capture(args, out: Path, **kw) -> dict:
    cfg = dict(teacher=args.teacher, data=[str(Path(args.corpus) / "heldout.jsonl")], out=str(out), seq_len=args.seq_len,
               batch_size=args.batch_size, shard_size=64, max_tokens=args.tokens, device=args.device, dtype=args.dtype, progress=False)
    cfg.update(kw)
    return precompute(PrecomputeConfig(**cfg))


def bare_loops(args, k: int) -> dict:
    """Teacher forward + top-k (and forward alone) over the same windows, without any writing."""
    from pipeline.common.device import resolve_device, resolve_dtype
    from pipeline.teacher import load_teacher, load_tokenizer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tok = load_tokenizer(args.teacher, None, False)
    model = load_teacher(args.teacher, None, dtype, device, False)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokens.bin"
        docs = iter_documents(list_data_files([str(Path(args.corpus) / "heldout.jsonl")]), "text", CorpusStats())
        n = tokenize_to_file(docs, tok, tok.eos_token_id, path, "uint16", args.tokens)
        tokens = np.fromfile(path, dtype=np.uint16)
    windows = count_windows(n, args.seq_len)
    batches = [torch.from_numpy(make_windows(tokens, b, min(args.batch_size, windows - b), args.seq_len,
                                             tok.eos_token_id)[0].astype(np.int64)).to(device)
               for b in range(0, windows, args.batch_size)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def loop(with_topk: bool) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for ids in batches:
                logits = model(input_ids=ids, use_cache=False).logits
                if with_topk:
                    lp = logits.float().log_softmax(-1)
                    top = lp.topk(k, -1)
                    top.values.half().cpu(), top.indices.cpu()
                else:
                    logits[..., :1].cpu()
        sync()
        return windows * args.seq_len / (time.perf_counter() - t0)

    loop(True)  # warm-up
    return {"forward_topk": max(loop(True) for _ in range(args.repeats)), "forward": max(loop(False) for _ in range(args.repeats))}


def p1(args) -> list[dict]:
    k = 64
    bare = bare_loops(args, k)
    best = 0.0
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            m = capture(args, Path(d) / "ds", top_k=k)
            best = max(best, m["created_by"]["sessions"][0]["tokens_per_second"])
            device = m["created_by"]["sessions"][0]["device"]
            dtype = m["teacher"]["dtype"]
    return [{"section": "P1", "device": device, "dtype": dtype, "top_k": k, "precompute_tok_s": round(best, 1),
             "bare_topk_tok_s": round(bare["forward_topk"], 1), "bare_forward_tok_s": round(bare["forward"], 1),
             "ratio_vs_topk_loop": round(best / bare["forward_topk"], 3), "ratio_vs_forward": round(best / bare["forward"], 3)}]


P4_CASES = [
    ("top-8", dict(top_k=8)), ("top-32", dict(top_k=32)), ("top-64", dict(top_k=64)),
    ("top-8 + hidden -1", dict(top_k=8, hidden_layers=[-1])), ("top-32 + hidden -1", dict(top_k=32, hidden_layers=[-1])),
    ("top-64 + hidden -1", dict(top_k=64, hidden_layers=[-1])),
    ("top-64 zstd", dict(top_k=64, compression="zstd")),
    ("top-64 compact (7-bit)", dict(top_k=64, encoding="compact", logprob_bits=7)),
    ("top-64 compact (5-bit)", dict(top_k=64, encoding="compact", logprob_bits=5)),
    ("top-64 compact + zstd", dict(top_k=64, encoding="compact", compression="zstd")),
    ("sampled N=8", dict(targets="sampled", samples=8)), ("sampled N=16", dict(targets="sampled", samples=16)),
    ("sampled N=32", dict(targets="sampled", samples=32)), ("sampled N=64", dict(targets="sampled", samples=64)),
    ("sampled N=8 compact", dict(targets="sampled", samples=8, encoding="compact")),
    ("sampled N=16 compact", dict(targets="sampled", samples=16, encoding="compact")),
    ("sampled N=32 compact", dict(targets="sampled", samples=32, encoding="compact")),
    ("sampled N=64 compact", dict(targets="sampled", samples=64, encoding="compact")),
    ("sampled N=16 compact + zstd", dict(targets="sampled", samples=16, encoding="compact", compression="zstd")),
]


def p4(args) -> list[dict]:
    rows = []
    for name, kw in P4_CASES:
        with tempfile.TemporaryDirectory() as d:
            m = capture(args, Path(d) / "ds", **kw)
        t = m["totals"]
        rows.append({"section": "P4", "case": name, "bytes_per_token": round(t["bytes_per_token"], 1),
                     "topk_mass": t.get("topk_mass_mean"), "recon_kl": t.get("recon_kl_mean"),
                     "sample_unique": t.get("sample_unique_mean"), "sample_mass": t.get("sample_mass_mean"),
                     "valid_tokens": t["valid_tokens"]})
    return rows


def run(args) -> list[dict]:
    rows = []
    if "p1" in args.sections:
        rows += p1(args)
    if "p4" in args.sections:
        rows += p4(args)
    return rows


def fmt(v, digits=4):
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict]) -> str:
    out = []
    p1_rows = [r for r in rows if r["section"] == "P1"]
    if p1_rows:
        out += ["| device | dtype | k | precompute tok/s | bare forward+top-k tok/s | bare forward tok/s | ÷ forward+top-k | ÷ forward |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['device']} | {r['dtype']} | {r['top_k']} | {r['precompute_tok_s']:.0f} | {r['bare_topk_tok_s']:.0f} | "
                f"{r['bare_forward_tok_s']:.0f} | **{r['ratio_vs_topk_loop']:.3f}** | {r['ratio_vs_forward']:.3f} |" for r in p1_rows]
        out.append("")
    p4_rows = [r for r in rows if r["section"] == "P4"]
    if p4_rows:
        out += ["| stored | bytes/token | mean top-k mass | KL(teacher ‖ stored) | unique ids/position | mass of drawn ids |",
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['case']} | {r['bytes_per_token']:.1f} | {fmt(r['topk_mass'])} | {fmt(r['recon_kl'])} | "
                f"{fmt(r['sample_unique'], 3)} | {fmt(r['sample_mass'])} |" for r in p4_rows]
        out.append(f"\n({p4_rows[0]['valid_tokens']} held-out tokens per capture.)")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = run(args)
    print(json.dumps(rows, indent=1), file=sys.stderr)
    print(markdown(rows))


if __name__ == "__main__":
    main()
