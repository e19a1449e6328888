"""Benchmark of the loss library: peak memory and time of one forward+backward, plain vs fused, side by side.

    python scripts/bench_losses.py [--vocab 32000 128000] [--tokens 4096] [--hidden 1024] [--quick]

Each (vocab, path) case runs in a fresh subprocess (this script with --child), so one case's allocations cannot hide
another's peak. Memory is the peak growth over the baseline taken after the inputs exist: on CPU ru_maxrss minus the
resident size at that point; on CUDA torch.cuda.max_memory_allocated minus memory_allocated. Paths:
- plain:    logits = hidden @ weight.T materialized, then plain_distill_loss (KD + CE)
- fused:    fused_distill_loss (KD + CE), logits built a chunk at a time
- fused-ce: fused_distill_loss without teacher targets (the CE-only baseline a KD step is compared with)
Time is wall-clock (and process CPU time, steadier when other jobs share the cores). Not a test: timings are machine
dependent. `run(args)` and `markdown(rows)` are importable by scripts/benchmark.py.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PATHS = ("plain", "fused", "fused-ce")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000], help="vocabulary sizes to compare")
    parser.add_argument("--tokens", type=int, default=4096, help="positions per step (8 x 512 by default)")
    parser.add_argument("--hidden", type=int, default=1024, help="student hidden size")
    parser.add_argument("--top-k", type=int, default=64, help="stored teacher ids per position")
    parser.add_argument("--loss", default="forward_kl", help="forward_kl | reverse_kl | jsd")
    parser.add_argument("--tail", default="renormalize", help="tail | renormalize | uniform")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the fused path")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden/weight dtype")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per case (0 = torch's default); 1 gives steadier timings on a shared machine")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run in seconds")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: JSON of one case
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.hidden = [8000, 32000], 512, 256
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Run every (vocab, path) case in its own subprocess; return one row per case."""
    rows = []
    for vocab in args.vocab:
        for path in args.paths:
            case = dict(vocab=vocab, path=path, tokens=args.tokens, hidden=args.hidden, top_k=args.top_k,
                        loss=args.loss, tail=args.tail, temperature=args.temperature, chunk_size=args.chunk_size,
                        dtype=args.dtype, device=args.device, threads=args.threads)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(case)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark case {case} failed:\n{proc.stderr[-4000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  vocab {vocab:>7} {path:<9} peak {rows[-1]['peak_mib']:9.1f} MiB  {rows[-1]['time_s']:8.3f} s "
                  f"(cpu {rows[-1]['cpu_s']:.3f} s)", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    """Table with ratios to the plain path (memory, time) and to the fused CE-only step (time)."""
    first = rows[0]
    lines = [f"{first['tokens']} tokens, hidden {first['hidden']}, {first['dtype']}, {first['device']}, "
             f"loss {first['loss']}, tail {first['tail']}, top-k {first['top_k']}, T {first['temperature']}, "
             f"chunk {first['chunk_size']}, threads {first['threads']}",
             "",
             "| vocab | path | peak MiB | wall s | cpu s | mem / plain | wall / plain | wall / fused-ce |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        same = {r["path"]: r for r in rows if r["vocab"] == row["vocab"]}

        def ratio(key, base):
            return f"{row[key] / same[base][key]:.2f}" if base in same and same[base][key] > 0 else "-"
        lines.append(f"| {row['vocab']} | {row['path']} | {row['peak_mib']:.0f} | {row['time_s']:.2f} | "
                     f"{row['cpu_s']:.2f} | "
                     f"{ratio('peak_mib', 'plain')} | {ratio('time_s', 'plain')} | {ratio('time_s', 'fused-ce')} |")
    hidden = [r for r in rows if r["pre_peak_mib"] >= 0.9 * r["peak_mib"]]
    if hidden:
        lines.append("")
        lines.append("warning: setup had already peaked near the step's peak for " +
                     ", ".join(f"{r['vocab']}/{r['path']}" for r in hidden) + "; their peak may be understated")
    return "\n".join(lines)


# --- child: one case in a fresh process ---------------------------------------------------------------------------------

def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _make_inputs(case, vocab, tokens, device):
    import math

    import torch
    g = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    # in-place scaling: an out-of-place temporary of the weight's size would raise the peak before the baseline
    hidden = torch.randn(tokens, case["hidden"], generator=g, device=device).div_(case["hidden"] ** 0.25).to(dtype)
    weight = torch.randn(vocab, case["hidden"], generator=g, device=device).div_(case["hidden"] ** 0.25).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    k = case["top_k"]
    # distinct ids per row without a (tokens, vocab) temporary, which would raise the baseline peak
    ids = (torch.arange(k, device=device) * (vocab // k) + torch.randint(0, vocab // k, (tokens, 1), generator=g,
                                                                         device=device)) % vocab
    logprobs = torch.log_softmax(torch.randn(tokens, k, generator=g, device=device) * 2, -1) + math.log(0.9)
    return (hidden.requires_grad_(), weight.requires_grad_(), labels, ids, logprobs)


def _child(case: dict) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from trainer.losses.config import LossConfig
    from trainer.losses.fused import fused_distill_loss
    from trainer.losses.plain import plain_distill_loss

    if case["threads"] > 0:
        torch.set_num_threads(case["threads"])
    device = case["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LossConfig(loss=case["loss"], tail=case["tail"], temperature=case["temperature"],
                     chunk_size=case["chunk_size"])

    def step(inputs):
        hidden, weight, labels, ids, logprobs = inputs
        if case["path"] == "plain":
            out = plain_distill_loss(hidden @ weight.T, labels, cfg, teacher_ids=ids, teacher_logprobs=logprobs)
        elif case["path"] == "fused":
            out = fused_distill_loss(hidden, weight, labels, cfg, teacher_ids=ids, teacher_logprobs=logprobs)
        else:
            out = fused_distill_loss(hidden, weight, labels, cfg)
        out.loss.backward()
        return out.loss.item()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step(_make_inputs(case, 512, 64, device))  # warm-up on tiny shapes: library init stays out of the measurement
    inputs = _make_inputs(case, case["vocab"], case["tokens"], device)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _resident_mib()
    # if the process had already peaked above the baseline by more than the step needs, the step's peak is hidden
    pre_peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _max_rss_mib()) - base
    start, cpu_start = time.perf_counter(), time.process_time()
    value = step(inputs)
    sync()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _max_rss_mib()
    return dict(case, device=device, peak_mib=peak - base, time_s=elapsed, cpu_s=cpu, loss_value=value,
                pre_peak_mib=pre_peak,
                threads=torch.get_num_threads())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
