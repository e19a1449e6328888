"""Benchmarks of stage two on real text, side by side in one run: the quality table, P2 training cost, P5 reader speed.

    python scripts/bench_train.py --teacher TEACHER_DIR [--seeds 0 1 2] [--steps 300] [--quick]

Captures the teacher's targets on the training split once (real `precompute`: top-64 and N=8 samples in one pass), then
trains students of the same size, steps and data order (real `train`) for every seed: CE only, online full-vocab KD,
cached top-64 (renormalize, tail), sampled N=8, and online KD given the same wall time as the cached top-64 student.
Evaluates each on the held-out split (real `evaluate`). Reports per row the mean ± standard deviation over seeds, which
differences are larger than twice the larger deviation, the amortized cost (one capture + N cached students against N
online students), P2 (offline-KD step time ÷ CE-only, online ÷ offline) and P5 (the streaming reader alone ÷ the
student's training tokens/s). `run(args)` / `markdown(rows)` serve scripts/benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset
from pipeline.precompute import precompute

EQUAL_WALL = "online KD, equal wall-clock"
DEFAULT_VARIANTS = ["CE only", "online full-vocab KD", "top-64 renormalize", "top-64 tail", "sampled N=8", EQUAL_WALL]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="teacher folder (scripts/make_teacher.py prints it); needed unless --curves")
    p.add_argument("--curves", nargs="+", metavar="RUN", help="only summarize these runs' metrics.jsonl (loss jumps, "
                   "gradient norms) and exit")
    p.add_argument("--corpus", default=str(REPO / ".cache" / "corpus"))
    p.add_argument("--work", default=str(REPO / ".cache" / "bench-train"), help="datasets and runs (reused when unchanged)")
    p.add_argument("--student-config", default=str(REPO / "scripts" / "configs" / "student-1.7m.json"))
    p.add_argument("--tokens", type=int, default=614400, help="training tokens captured (one epoch of the default run)")
    p.add_argument("--heldout-tokens", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: a tenth of --steps)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--capture-dtype", default="bfloat16")
    p.add_argument("--train-dtype", default="bfloat16")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="rows, by name; also available: top-64 uniform, top-8 renormalize, sampled N=16|32|64, top-64 T=2 exact "
                        "tail, top-64 T=2 approximate renormalize, ...")
    p.add_argument("--log-every", type=int, default=1, help="metrics.jsonl line every this many steps (the curves)")
    p.add_argument("--equal-steps", type=int, default=None,
                   help="steps of the equal-wall-clock online row (default: measured from the first seed's top-64 and "
                        "online runs)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if not a.teacher and not a.curves:
        p.error("--teacher is needed (or --curves RUN...)")
    if a.quick:
        a.tokens, a.heldout_tokens, a.steps, a.seeds = 16384, 8192, 8, [0, 1]
        a.work = str(Path(a.work).with_name(Path(a.work).name + "-quick"))
    if a.warmup is None:
        a.warmup = max(1, a.steps // 10)
    return a


def capture(args, split: str, name: str, max_tokens: int, **kw) -> Path:
    """A real capture of the first `max_tokens` of the split, documents in hash order (a fair sample of the stdlib)."""
    import make_corpus

    out = Path(args.work) / f"{split}-{name}-{max_tokens}"
    data = make_corpus.mixed_split(args.corpus, split)
    cfg = dict(teacher=args.teacher, data=[str(data)], out=str(out), seq_len=args.seq_len,
               batch_size=8, shard_size=128, max_tokens=max_tokens, dtype=args.capture_dtype, device="cpu", progress=False)
    cfg.update(kw)
    t0 = time.perf_counter()
    precompute(PrecomputeConfig(**cfg))  # resumes or returns at once when the dataset is complete
    print(f"[bench] capture {out.name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return out


def capture_seconds(path: Path) -> float:
    """Seconds the teacher spent capturing this dataset (the capture loop of every session, from the manifest)."""
    return sum(s["seconds"] for s in open_dataset(str(path)).manifest.created_by.sessions)


def all_variants(args) -> dict[str, tuple[str, dict]]:
    """name -> (dataset key, train flags) of every student the table can hold."""
    v = {"CE only": ("top64", dict(ce_only=True)),
         "online full-vocab KD": ("top64", dict(online_teacher=args.teacher)),
         EQUAL_WALL: ("top64", dict(online_teacher=args.teacher))}
    for tail in ("renormalize", "tail", "uniform"):
        v[f"top-64 {tail}"] = ("top64", dict(tail=tail, targets="topk"))
        v[f"top-8 {tail}"] = ("top8", dict(tail=tail, targets="topk"))
    for n in (8, 16, 32, 64):
        v[f"sampled N={n}"] = ("top64" if n == 8 else f"sampled{n}", dict(targets="sampled", tail="tail"))
    v["compact top-64 renormalize"] = ("compact", dict(tail="renormalize", targets="topk"))
    # temperature 2: exact with the log-normalizer stored at capture (--temperatures 1,2), and without it
    v["top-64 T=2 exact tail"] = ("top64t2", dict(tail="tail", targets="topk", temperature=2.0))
    v["top-64 T=2 approximate renormalize"] = ("top64", dict(tail="renormalize", targets="topk", temperature=2.0,
                                                             approximate_temperature=True))
    return v


def datasets(args, keys: set[str]) -> dict[str, Path]:
    """The captures the chosen rows read; `top64` holds top-64 and N=8 samples from one teacher pass."""
    make = {"top64": lambda: capture(args, "train", "top64-s8", args.tokens, top_k=64, targets="both", samples=8),
            "top8": lambda: capture(args, "train", "top8", args.tokens, top_k=8),
            "compact": lambda: capture(args, "train", "compact64", args.tokens, top_k=64, encoding="compact"),
            "top64t2": lambda: capture(args, "train", "top64-t12", args.tokens, top_k=64, temperatures=[1.0, 2.0])}
    for n in (16, 32, 64):
        make[f"sampled{n}"] = lambda n=n: capture(args, "train", f"sampled{n}", args.tokens, targets="sampled", samples=n)
    return {k: make[k]() for k in sorted(keys | {"top64"})}


def train_one(args, name: str, seed: int, data: Path, flags: dict, heldout: Path, steps: int | None = None) -> dict:
    """Train and evaluate one student (reused when its folder holds a finished run with these settings)."""
    from trainer.config import EvalConfig, TrainConfig
    from trainer.evaluate import evaluate
    from trainer.train import train

    steps = steps or args.steps
    slug = name.replace(" ", "_").replace("=", "").replace("-", "").replace(",", "")
    out = Path(args.work) / "runs" / f"{slug}-s{seed}-{steps}x{args.batch_size}-lr{args.lr:g}-w{args.warmup}"
    if (out / "run.json").exists() and (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    warmup = args.warmup if steps == args.steps else max(1, round(args.warmup * steps / args.steps))
    cfg = TrainConfig(data=str(data), out=str(out), student_config=args.student_config, steps=steps,
                      batch_size=args.batch_size, lr=args.lr, warmup=warmup, seed=seed, alpha=args.alpha,
                      save_every=steps, log_every=args.log_every, dtype=args.train_dtype, device="cpu", progress=False,
                      **flags)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in lines if "loss" in x]
    warm = min(10, steps // 2)  # the first steps pay for allocator and thread warm-up
    speeds = [x["tokens_per_s"] for x in lines if x["step"] > warm]
    m = evaluate(EvalConfig(student=str(out), data=str(heldout), batch_size=16, device="cpu"))
    result = {"variant": name, "seed": seed, "steps": steps, "held_out_ce": m["ce"], "top1_agreement": m["top1_agreement"],
              "ece": m["ece"], "kl": m["kl"], "train_tokens_per_s": statistics.median(speeds) if speeds else None,
              "train_seconds": seconds,
              "step_seconds": args.batch_size * args.seq_len / statistics.median(speeds) if speeds else None,
              "max_grad_norm": max(x["grad_norm"] for x in lines), "final_train_loss": lines[-1]["loss"],
              "bytes_per_token": None if flags.get("online_teacher") else
              open_dataset(str(data)).manifest.totals.bytes_per_token}
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"[bench] {name} seed {seed}: CE {m['ce']:.4f} ({seconds:.0f}s)", file=sys.stderr)
    return result


def reader_speed(path: Path, batch_size: int, kind: str, batches: int = 200) -> float:
    """Tokens/s of the streaming reader alone (decode + tensors), as the trainer drives it."""
    from trainer.data import WindowReader

    reader = WindowReader(str(path), batch_size, seed=0, targets=kind)
    it = iter(reader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def run(args) -> list[dict]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    table = all_variants(args)
    unknown = [v for v in args.variants if v not in table]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; known: {list(table)}")
    # --- captures
    data = datasets(args, {table[v][0] for v in args.variants})
    heldout = capture(args, "heldout", "top64", args.heldout_tokens, top_k=64)
    rows = [{"section": "capture", "dataset": "top64", "seconds": capture_seconds(data["top64"]), "tokens": args.tokens}]
    # --- students: every seed of the cached rows first, then the online rows (3x the cost each), so a run cut short
    # still has whole rows. The equal-wall-clock row gets as many online steps as the cached top-64 student's training
    # time allows, from the first seed's median step times (not whole-run wall times: robust to other load).
    online_rows = [v for v in args.variants if table[v][1].get("online_teacher")]
    order = [(v, seed) for v in args.variants if v not in online_rows for seed in args.seeds]
    order += [(v, seed) for seed in args.seeds for v in online_rows]
    equal_steps = args.equal_steps
    for name, seed in order:
        key, flags = table[name]
        if name == EQUAL_WALL and equal_steps is None:
            first = args.seeds[0]
            ref = train_one(args, "top-64 renormalize", first, data["top64"], dict(table["top-64 renormalize"][1]), heldout)
            online = train_one(args, "online full-vocab KD", first, data["top64"], dict(table["online full-vocab KD"][1]),
                               heldout)
            equal_steps = max(1, round(args.steps * ref["step_seconds"] / online["step_seconds"]))
        steps = equal_steps if name == EQUAL_WALL else None
        rows.append({"section": "quality"} | train_one(args, name, seed, data[key], dict(flags), heldout, steps))
    # --- P5: reader alone vs the student's training speed on the same data
    for kind, variant in (("topk", "top-64 renormalize"), ("sampled", "sampled N=8")):
        speeds = [r["train_tokens_per_s"] for r in rows if r.get("variant") == variant]
        if speeds:
            speed = reader_speed(data["top64"], args.batch_size, kind)
            rows.append({"section": "P5", "kind": kind, "reader_tokens_per_s": speed,
                         "train_tokens_per_s": statistics.median(speeds), "ratio": speed / statistics.median(speeds)})
    return rows


# ----------------------------------------------------------------------------- the tables

def summarize(q: list[dict]) -> dict[str, dict]:
    """Per row: mean and standard deviation (n - 1) over seeds of every figure."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in q):
        rs = [r for r in q if r["variant"] == name]
        ce = [r["held_out_ce"] for r in rs]
        mean = lambda k: statistics.mean(r[k] for r in rs if r.get(k) is not None)
        out[name] = {"n": len(rs), "mean": statistics.mean(ce), "std": statistics.stdev(ce) if len(ce) > 1 else float("nan"),
                     "seeds": {r["seed"]: r["held_out_ce"] for r in rs}, "top1": mean("top1_agreement"), "ece": mean("ece"),
                     "train_s": mean("train_seconds"), "step_s": mean("step_seconds"), "steps": rs[0]["steps"],
                     "max_grad_norm": max(r.get("max_grad_norm", float("nan")) for r in rs),
                     "bytes": rs[0]["bytes_per_token"]}
    return out


def separated(a: dict, b: dict) -> bool:
    """An ordering is claimed only where the means differ by more than twice the larger standard deviation (and never
    for a row with a single seed: its deviation is unknown)."""
    if a["n"] < 2 or b["n"] < 2:
        return False
    return abs(a["mean"] - b["mean"]) > 2 * max(a["std"], b["std"])


def markdown(rows: list[dict]) -> str:
    q = [r for r in rows if r["section"] == "quality"]
    out = []
    if q:
        s = summarize(q)
        base = s.get("CE only")
        seeds = sorted({r["seed"] for r in q})
        out += ["| student | steps | held-out CE, mean ± std | std ÷ CE | vs CE-only | "
                + " | ".join(f"seed {x}" for x in seeds) + " | top-1 agree | ECE | train s | max grad norm | bytes/token |",
                "|" + " --- |" * (10 + len(seeds))]
        for name, r in s.items():
            vs = f"{100 * (r['mean'] - base['mean']) / base['mean']:+.2f}%" if base else "–"
            if base and name != "CE only":
                vs += (" (1 seed: no claim)" if r["n"] < 2 else " (separated)" if separated(r, base) else " (within noise)")
            cells = [f"{r['seeds'][x]:.4f}" if x in r["seeds"] else "–" for x in seeds]
            out.append(f"| {name} | {r['steps']} | {r['mean']:.4f} ± {r['std']:.4f} | {100 * r['std'] / r['mean']:.2f}% | "
                       f"{vs} | " + " | ".join(cells) + f" | {r['top1']:.3f} | {r['ece']:.4f} | {r['train_s']:.0f} | "
                       f"{r['max_grad_norm']:.2f} | " + (f"{r['bytes']:.1f} |" if r["bytes"] else "– |"))
        names = list(s)
        pairs = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                lo, hi = sorted((a, b), key=lambda n: s[n]["mean"])
                gap = s[hi]["mean"] - s[lo]["mean"]
                verdict = ("**better**" if separated(s[a], s[b]) else
                           "no claim: 1 seed" if min(s[a]["n"], s[b]["n"]) < 2 else "not separated")
                pairs.append(f"| {lo} vs {hi} | {gap:.4f} | {2 * max(s[a]['std'], s[b]['std']):.4f} | "
                             f"{lo + ' ' + verdict if verdict == '**better**' else verdict} |")
        out += ["", "| pair (lower CE first) | Δ mean | 2 × larger std | ordering |", "| --- | --- | --- | --- |"] + pairs
        cap = next((r for r in rows if r["section"] == "capture"), None)
        off, onl = s.get("top-64 renormalize"), s.get("online full-vocab KD")
        if cap and off and onl:  # training loop time = median step time x steps (robust to other load on the machine)
            c, t_off, t_on = cap["seconds"], off["step_s"] * off["steps"], onl["step_s"] * onl["steps"]
            even = c / (t_on - t_off) if t_on > t_off else float("inf")
            out += ["", "| amortized wall time | N = 1 | N = 3 | N = 10 | break-even N |", "| --- | --- | --- | --- | --- |",
                    f"| capture ({c:.0f} s) + N cached top-64 students ({t_off:.0f} s each) | "
                    + " | ".join(f"{c + n * t_off:.0f} s" for n in (1, 3, 10)) + f" | **{math.ceil(even) if math.isfinite(even) else '–'}** |",
                    f"| N online-KD students ({t_on:.0f} s each) | " + " | ".join(f"{n * t_on:.0f} s" for n in (1, 3, 10)) + " | |"]
        kd, ce_only = s.get("top-64 renormalize"), s.get("CE only")
        if kd and ce_only:
            out += ["", "| P2 training cost | ratio |", "| --- | --- |",
                    f"| offline top-64 KD step ÷ CE-only step | **{kd['step_s'] / ce_only['step_s']:.3f}** |"]
            if onl:
                out.append(f"| online full-vocab KD step ÷ offline KD step | {onl['step_s'] / kd['step_s']:.3f} |")
    p5 = [r for r in rows if r["section"] == "P5"]
    if p5:
        out += ["", "| P5 reader | reader tokens/s | student training tokens/s | ratio |", "| --- | --- | --- | --- |"]
        out += [f"| {r['kind']} | {r['reader_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | **{r['ratio']:.1f}** |" for r in p5]
    return "\n".join(out)


def kd_verdict(kd_ce: float, ce_ce: float, seed_std: float, measured_settings: bool = True) -> str:
    """One sentence for the demo: did KD help, judged against the seed-to-seed standard deviation measured here.

    Same rule as the table: a difference counts only when it is more than twice the deviation.
    """
    diff, pct = kd_ce - ce_ce, 100 * (kd_ce - ce_ce) / ce_ce
    where = ("measured at these settings, BENCHMARKS.md" if measured_settings else
             "measured at the demo's default settings, BENCHMARKS.md; yours differ, so take it as a rough guide")
    if abs(diff) > 2 * seed_std:
        return (f"KD {'helped' if diff < 0 else 'hurt'}: held-out CE {diff:+.4f} nats/token ({pct:+.2f}%) against CE-only, "
                f"more than twice the seed-to-seed standard deviation of {seed_std:.4f} ({where}).")
    return (f"No measurable effect of KD: held-out CE {diff:+.4f} nats/token ({pct:+.2f}%) against CE-only is within "
            f"twice the seed-to-seed standard deviation of {seed_std:.4f} ({where}); it is noise.")


def curve_summary(run: Path, jump: float = 0.3) -> str:
    """One line per run: held-out CE, gradient-norm median/p95/max (and its step), and the steps whose batch loss is
    more than `jump` nats above the mean of the 10 steps before (a spike, or a hard batch)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lines = [x for x in lines if "loss" in x]
    if not lines:
        return f"{run.name}: no training lines"
    norms = sorted(x["grad_norm"] for x in lines)
    top = max(lines, key=lambda x: x["grad_norm"])
    losses = [x["loss"] for x in lines]
    jumps = [x["step"] for i, x in enumerate(lines) if i >= 10 and x["loss"] > statistics.mean(losses[i - 10:i]) + jump]
    ce = json.loads((run / "eval.json").read_text())["held_out_ce"] if (run / "eval.json").exists() else None
    return (f"{run.name}: held-out CE {ce if ce is None else round(ce, 4)}, grad norm median {norms[len(norms) // 2]:.2f} "
            f"p95 {norms[int(0.95 * len(norms))]:.2f} max {top['grad_norm']:.2f} (step {top['step']}), "
            f"loss jumps at steps {jumps}")


def main(argv=None):
    args = parse_args(argv)
    if args.curves:
        print("\n".join(curve_summary(Path(r)) for r in args.curves))
        return
    rows = run(args)
    Path(args.work, "rows.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
