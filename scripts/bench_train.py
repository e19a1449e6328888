"""Benchmarks of stage two on real text, side by side in one run: P2 training cost, P5 reader speed, the quality table.

    python scripts/bench_train.py --teacher TEACHER_DIR [--tokens 614400] [--steps 300] [--seeds 0 1] [--quick]

Captures the teacher's targets on the training split once per stored kind (real `precompute`), then trains students of
the same size, steps, seed and data order (real `train`) with: CE only, online full-vocab KD, cached top-64 with each
tail handling, cached top-8 with the best one, sampled targets for several N, compact top-64; evaluates each on the
held-out split (real `evaluate`). P2: offline-KD step time ÷ CE-only, online ÷ offline (from the same runs). P5: the
streaming reader alone ÷ the student's training tokens/s. `run(args)` / `markdown(rows)` serve scripts/benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from pipeline.config import PrecomputeConfig  # noqa: E402
from pipeline.format import open_dataset  # noqa: E402
from pipeline.precompute import precompute  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--corpus", default=str(REPO / ".cache" / "corpus"))
    p.add_argument("--work", default=str(REPO / ".cache" / "bench-train"), help="datasets and runs (reused when unchanged)")
    p.add_argument("--student-config", default=str(REPO / "scripts" / "configs" / "student-1.7m.json"))
    p.add_argument("--tokens", type=int, default=614400, help="training tokens captured (one epoch of the default run)")
    p.add_argument("--heldout-tokens", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32, 64], help="N of the sampled-targets curve")
    p.add_argument("--capture-dtype", default="bfloat16")
    p.add_argument("--train-dtype", default="bfloat16")
    p.add_argument("--variants", nargs="+", default=None, help="only these variant names")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.heldout_tokens, a.steps, a.seeds, a.samples = 16384, 8192, 8, [0], [8]
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


def variants(args, data: dict) -> list[tuple[str, dict]]:
    """(name, train flags) of every student in the quality table."""
    v = [("CE only", dict(data=data["top64"], ce_only=True)),
         ("online full-vocab KD", dict(data=data["top64"], online_teacher=args.teacher))]
    v += [(f"top-64 {tail}", dict(data=data["top64"], tail=tail, targets="topk")) for tail in ("renormalize", "tail", "uniform")]
    v += [(f"top-8 {tail}", dict(data=data["top8"], tail=tail, targets="topk")) for tail in ("renormalize", "uniform")]
    v += [(f"sampled N={n}", dict(data=data[f"sampled{n}"], targets="sampled", tail="tail")) for n in args.samples]
    v.append(("compact top-64 renormalize", dict(data=data["compact"], tail="renormalize", targets="topk")))
    if args.variants:
        v = [x for x in v if x[0] in args.variants]
    return v


def train_one(args, name: str, seed: int, flags: dict, heldout: Path) -> dict:
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate
    from trainer.config import EvalConfig
    from trainer.train import train

    slug = name.replace(" ", "_").replace("=", "").replace("-", "")
    out = Path(args.work) / "runs" / f"{slug}-s{seed}-{args.steps}"
    if (out / "run.json").exists() and (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = TrainConfig(data=str(flags.pop("data")), out=str(out), student_config=args.student_config, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup=max(1, args.steps // 10), seed=seed, alpha=args.alpha,
                      save_every=args.steps, log_every=min(10, max(1, args.steps // 4)), dtype=args.train_dtype, device="cpu", progress=False, **flags)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    warm = min(10, args.steps // 2)  # the first steps pay for allocator and thread warm-up
    speeds = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x and x["step"] > warm]
    m = evaluate(EvalConfig(student=str(out), data=str(heldout), batch_size=16, device="cpu"))
    result = {"variant": name, "seed": seed, "held_out_ce": m["ce"], "top1_agreement": m["top1_agreement"], "ece": m["ece"],
              "kl": m["kl"], "train_tokens_per_s": statistics.median(speeds) if speeds else None, "train_seconds": seconds,
              "step_seconds": args.batch_size * args.seq_len / statistics.median(speeds) if speeds else None,
              "bytes_per_token": open_dataset(cfg.data).manifest["totals"]["bytes_per_token"] if not flags.get("online_teacher") else None}
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
    # --- captures: one teacher pass per stored kind (a pass can store top-k and samples at once)
    n0 = args.samples[-1] if args.samples else 32
    data = {"top64": capture(args, "train", f"top64-s{n0}", args.tokens, top_k=64, targets="both", samples=n0),
            "top8": capture(args, "train", "top8", args.tokens, top_k=8)}
    data[f"sampled{n0}"] = data["top64"]
    for n in args.samples:
        if n != n0:
            data[f"sampled{n}"] = capture(args, "train", f"sampled{n}", args.tokens, targets="sampled", samples=n)
    data["compact"] = capture(args, "train", "compact64", args.tokens, top_k=64, encoding="compact")
    heldout = capture(args, "heldout", "top64", args.heldout_tokens, top_k=64)
    # --- students
    rows = []
    for seed in args.seeds:
        for name, flags in variants(args, data):
            rows.append({"section": "quality"} | train_one(args, name, seed, dict(flags), heldout))
    # --- P5: reader alone vs the student's training speed on the same data
    for kind, key in (("topk", "top64"), ("sampled", f"sampled{n0}")):
        speed = reader_speed(data[key], args.batch_size, kind)
        train_speed = statistics.median(r["train_tokens_per_s"] for r in rows if r.get("variant") == ("top-64 renormalize" if kind == "topk" else f"sampled N={n0}"))
        rows.append({"section": "P5", "kind": kind, "reader_tokens_per_s": speed, "train_tokens_per_s": train_speed, "ratio": speed / train_speed})
    return rows


def markdown(rows: list[dict]) -> str:
    q = [r for r in rows if r["section"] == "quality"]
    out = []
    if q:
        seeds = sorted({r["seed"] for r in q})
        names = list(dict.fromkeys(r["variant"] for r in q))
        ce = {(r["variant"], r["seed"]): r for r in q}
        base = {s: ce[("CE only", s)]["held_out_ce"] for s in seeds if ("CE only", s) in ce}
        online = {s: ce[("online full-vocab KD", s)]["held_out_ce"] for s in seeds if ("online full-vocab KD", s) in ce}
        head = " | ".join(f"CE seed {s} | Δ vs CE-only s{s} | vs online s{s}" for s in seeds)
        out += [f"| student | {head} | top-1 agree | ECE | step s | bytes/token |", "|" + " --- |" * (5 + 3 * len(seeds))]
        for name in names:
            cells = []
            for s in seeds:
                r = ce.get((name, s))
                if r is None:
                    cells += ["–", "–", "–"]
                    continue
                d = 100 * (r["held_out_ce"] - base[s]) / base[s] if s in base else None
                o = 100 * (r["held_out_ce"] - online[s]) / online[s] if s in online else None
                cells += [f"{r['held_out_ce']:.4f}", f"{d:+.2f}%" if d is not None else "–", f"{o:+.2f}%" if o is not None else "–"]
            rs = [ce[(name, s)] for s in seeds if (name, s) in ce]
            mean = lambda k: statistics.mean(r[k] for r in rs if r[k] is not None)  # noqa: E731
            bpt = rs[0]["bytes_per_token"]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {mean('top1_agreement'):.3f} | {mean('ece'):.4f} | "
                       f"{mean('step_seconds'):.3f} | {bpt:.1f} |" if bpt else f"| {name} | " + " | ".join(cells) +
                       f" | {mean('top1_agreement'):.3f} | {mean('ece'):.4f} | {mean('step_seconds'):.3f} | – |")
        # P2 from the same runs
        def step(name):
            xs = [r["step_seconds"] for r in q if r["variant"] == name]
            return statistics.mean(xs) if xs else None
        kd, ce_only, onl = step("top-64 renormalize"), step("CE only"), step("online full-vocab KD")
        if kd and ce_only:
            out += ["", "| P2 training cost | ratio |", "| --- | --- |",
                    f"| offline top-64 KD step ÷ CE-only step | **{kd / ce_only:.3f}** |"]
            if onl:
                out.append(f"| online full-vocab KD step ÷ offline KD step | {onl / kd:.3f} |")
    p5 = [r for r in rows if r["section"] == "P5"]
    if p5:
        out += ["", "| P5 reader | reader tokens/s | student training tokens/s | ratio |", "| --- | --- | --- | --- |"]
        out += [f"| {r['kind']} | {r['reader_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | **{r['ratio']:.1f}** |" for r in p5]
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    rows = run(args)
    Path(args.work, "rows.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
