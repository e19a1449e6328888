"""Chunked capture head vs whole-batch head: peak memory and tokens/s of the capture step (teacher forward + targets).

A random small-body Llama teacher (2 layers, width 256) with a large vocabulary; each case runs in a fresh subprocess so
its peak RSS is its own. Reports peak RSS, the peak above the loaded model (what the capture step adds) and tokens/s,
then the largest batch (doubling) whose capture step stays within a memory budget, both ways.

    nice -n 10 .venv/bin/python scripts/bench_head.py [--vocabs 128000 256000] [--batch 8] [--seq 256] [--budget-gib 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def case(vocab: int, batch: int, seq: int, chunk: int, steps: int) -> dict:
    """One capture configuration in this process (called in a subprocess)."""
    import resource

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.format.sections import Capture
    from pipeline.precompute import batch_targets, split_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    capture = Capture.build(targets=["topk"], top_k=64, encoding="exact", logprob_bits=7, compression="none", vocab_size=vocab,
                            hidden_layers=[], samples=32, sample_temperature=1.0, seed=0, batch_size=batch, shard_size=256, world_size=1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    head = split_head(model, chunk)
    rng = np.random.default_rng(0)
    device = torch.device("cpu")
    times = []
    with torch.inference_mode():
        for step in range(steps + 1):
            ids = rng.integers(0, vocab, (batch, seq + 1))
            input_ids, labels, mask = ids[:, :-1], ids[:, 1:], np.ones((batch, seq), bool)
            x = torch.from_numpy(input_ids)
            t0 = time.perf_counter()
            if head is not None:
                if not head.verified:
                    assert head.check(x)
                out = head.body_forward(x, False)
                batch_targets(None, labels, mask, 0, capture, device, head=head, final_hidden=out.last_hidden_state)
            else:
                out = model(input_ids=x, use_cache=False)
                batch_targets(out.logits, labels, mask, 0, capture, device)
                del out
            if step:  # the first step warms up (and runs the head check)
                times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"vocab": vocab, "batch": batch, "seq": seq, "chunk": chunk, "peak_gib": round(peak, 3),
            "above_model_gib": round(peak - base, 3), "tokens_per_s": round(batch * seq / (sum(times) / len(times)), 1)}


def run_case(**kw) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps(kw)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        return {**kw, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--vocabs", type=int, nargs="+", default=[128000, 256000])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--budget-gib", type=float, default=3.0)
    ap.add_argument("--max-batch", type=int, default=64)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(**json.loads(a.case))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seq {a.seq}, top-k 64, chunk {a.chunk} tokens")
    print("| vocab | head | batch | peak RSS GiB | above model GiB | tokens/s | memory ratio | speed ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for v in a.vocabs:
        whole = run_case(vocab=v, batch=a.batch, seq=a.seq, chunk=0, steps=a.steps)
        chunked = run_case(vocab=v, batch=a.batch, seq=a.seq, chunk=a.chunk, steps=a.steps)
        for name, r in (("whole", whole), (f"chunk {a.chunk}", chunked)):
            if "error" in r:
                print(f"| {v} | {name} | {a.batch} | error: {r['error']} |")
                continue
            ratio = "" if r is whole else f"{r['above_model_gib'] / whole['above_model_gib']:.2f}x | {r['tokens_per_s'] / whole['tokens_per_s']:.2f}x"
            print(f"| {v} | {name} | {a.batch} | {r['peak_gib']} | {r['above_model_gib']} | {r['tokens_per_s']} | {ratio} |", flush=True)
    v = a.vocabs[0]
    for name, chunk in (("whole", 0), (f"chunk {a.chunk}", a.chunk)):
        best, b = None, 1
        while b <= a.max_batch:
            r = run_case(vocab=v, batch=b, seq=a.seq, chunk=chunk, steps=1)
            if "error" in r or r["above_model_gib"] > a.budget_gib:
                break
            best, b = r, b * 2
        print(f"largest batch (doubling, <= {a.max_batch}) within {a.budget_gib} GiB above the model, vocab {v}, {name}: "
              f"{best['batch'] if best else 'none'} ({best['above_model_gib'] if best else '-'} GiB)", flush=True)


if __name__ == "__main__":
    main()
