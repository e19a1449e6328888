"""Chat benchmark (issue 11): KD against CE-only students on held-out conversations, learning on assistant tokens only.

    TEACHER=$(python scripts/make_teacher.py --chat)      # the chat teacher (scripts/chat_teacher.py)
    python scripts/bench_chat.py --teacher "$TEACHER" [--seeds 0 1 2] [--steps 200] [--quick]

Captures the training conversations (`scripts/make_corpus.py --chat`, ordered by a hash of each definition's name so
that every part of the run sees every part of the stdlib) and all held-out conversations with the real `precompute`
(`--format chat --train-on assistant`, top-64: targets stored at assistant tokens only), trains CE-only and top-64
students (`--tail tail`, the default and the quality table's best stored row, and `renormalize`) for every seed with
the real `train`, evaluates each with the real
`evaluate` (metrics over `loss_mask` = 1, the assistant tokens), and prints the rows with the quality table's rules
(scripts/bench_train.py: mean ± std over seeds, an ordering only beyond twice the larger std). The teacher itself is
evaluated on the same held-out dataset as a reference line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_train  # noqa: E402  (sibling script: capture bookkeeping, train_one, the table)
from pipeline.config import PrecomputeConfig  # noqa: E402
from pipeline.precompute import precompute  # noqa: E402

VARIANTS = ["CE only", "top-64 tail", "top-64 renormalize"]  # tail: the default --tail of train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="chat teacher folder (make_teacher.py --chat prints it)")
    p.add_argument("--corpus", default=str(REPO / ".cache" / "corpus"), help="folder with chat-train/chat-heldout.jsonl")
    p.add_argument("--work", default=str(REPO / ".cache" / "bench-chat"),
                   help="the ordered conversations, and per teacher (WORK/TEACHER_NAME) its datasets and runs; all reused "
                        "when unchanged")
    p.add_argument("--student-config", default=str(REPO / "scripts" / "configs" / "student-1.7m-chat.json"))
    p.add_argument("--tokens", type=int, default=819200, help="training conversation tokens captured (one epoch)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: a tenth of --steps)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--capture-dtype", default="bfloat16")
    p.add_argument("--train-dtype", default="bfloat16")
    p.add_argument("--variants", nargs="+", default=VARIANTS, help="rows, by bench_train.py's names")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a smoke run: 16k tokens, 8 steps, seeds 0 1")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.steps, a.seeds = 16384, 8, [0, 1]
        a.work = str(Path(a.work).with_name(Path(a.work).name + "-quick"))
    if a.warmup is None:
        a.warmup = max(1, a.steps // 10)
    return a


def mixed_conversations(corpus: Path, work: Path) -> Path:
    """chat-train.jsonl ordered by sha256 of each conversation's qualified name (written once, atomically): the
    corpus file is in path order, so a capture of its first N tokens, and a reader's shard blocks, would hold whole
    alphabetical stretches of the stdlib."""
    source = corpus / "chat-train.jsonl"
    out = work / "chat-train-mixed.jsonl"
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.sort(key=lambda line: hashlib.sha256(json.loads(line)["name"].encode()).hexdigest())
    tmp = work / f".{out.name}.tmp-{os.getpid()}"
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


def capture_chat(args, data: Path, name: str, max_tokens: int | None) -> Path:
    """A real capture of conversations, assistant tokens trained, top-64; resumes or returns when complete."""
    out = Path(args.work) / name
    t0 = time.perf_counter()
    precompute(PrecomputeConfig(teacher=args.teacher, data=[str(data)], out=str(out), format="chat",
                                train_on="assistant", seq_len=args.seq_len, top_k=64, batch_size=8, shard_size=128,
                                max_tokens=max_tokens, dtype=args.capture_dtype, device="cpu", progress=False))
    print(f"[bench] capture {out.name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return out


def teacher_reference(args, heldout: Path) -> dict:
    """The teacher evaluated as if it were a student on the held-out dataset: its CE on the same trained positions."""
    from trainer.config import EvalConfig
    from trainer.evaluate import evaluate

    path = Path(args.work) / "teacher-eval.json"
    if path.exists() and json.loads(path.read_text()).get("teacher") == str(Path(args.teacher).resolve()):
        return json.loads(path.read_text())
    m = evaluate(EvalConfig(student=args.teacher, data=str(heldout), batch_size=16, device="cpu"))
    result = {"teacher": str(Path(args.teacher).resolve()), "held_out_ce": m["ce"], "tokens": m.get("tokens")}
    path.write_text(json.dumps(result, indent=1))
    return result


def run(args) -> list[dict]:
    import torch

    from pipeline.format import open_dataset

    torch.set_num_threads(os.cpu_count() or 1)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    conversations = mixed_conversations(Path(args.corpus), Path(args.work))  # the same file (path) for every teacher
    args.work = str(Path(args.work) / Path(args.teacher).resolve().name)  # what train_one writes under
    table = bench_train.all_variants(args)
    unknown = [v for v in args.variants if v not in table or table[v][0] != "top64" or table[v][1].get("online_teacher")]
    if unknown:
        raise SystemExit(f"--variants {unknown}: only rows of a stored top-64 capture are benched here")
    # --- captures: the training conversations (one epoch of the students) and every held-out conversation
    data = capture_chat(args, conversations, f"train-top64-{args.tokens}", args.tokens)
    heldout = capture_chat(args, Path(args.corpus) / "chat-heldout.jsonl", "heldout-top64", None)
    totals = {k: open_dataset(str(p)).manifest.totals for k, p in (("train", data), ("heldout", heldout))}
    rows = [{"section": "capture", "dataset": "top64", "seconds": bench_train.capture_seconds(data), "tokens": args.tokens,
             "positions": {k: t.tokens for k, t in totals.items()}, "trained": {k: t.valid_tokens for k, t in totals.items()}},
            {"section": "teacher"} | teacher_reference(args, heldout)]
    # --- students: every seed of every row, same windows in the same order within a seed
    for name in args.variants:
        for seed in args.seeds:
            rows.append({"section": "quality"} | bench_train.train_one(args, name, seed, data, dict(table[name][1]), heldout))
    return rows


def main(argv=None):
    args = parse_args(argv)
    rows = run(args)
    Path(args.work, "rows.json").write_text(json.dumps(rows, indent=1))
    cap = rows[0]
    print(f"capture: train {cap['positions']['train']:,} positions ({cap['trained']['train']:,} assistant tokens, "
          f"{cap['seconds']:.0f}s); held-out {cap['positions']['heldout']:,} positions "
          f"({cap['trained']['heldout']:,} assistant tokens)")
    print(f"teacher on the held-out assistant tokens: CE {rows[1]['held_out_ce']:.4f}\n")
    print(bench_train.markdown(rows))


if __name__ == "__main__":
    main()
