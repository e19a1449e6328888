"""Forward KL at temperature T between a teacher and a student, computed from stored top-k in every way the trainer can
(exact with the stored log-normalizer; the three --tail approximations without it) against the full-vocabulary value.

    python scripts/bench_temperature.py --teacher .cache/teacher-... --student RUN/model --data .cache/corpus/heldout.jsonl

Captures `--tokens` held-out tokens with `distill precompute --top-k K --temperatures 1,T` (into --work), runs the
teacher and the student on the same windows, and prints one markdown table row per way (T^2-scaled, as the loss
reports it). CPU is fine for the 13.8M teacher of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PrecomputeConfig  # noqa: E402
from pipeline.format import open_dataset  # noqa: E402
from pipeline.precompute import precompute  # noqa: E402
from trainer.losses.config import LossConfig  # noqa: E402
from trainer.losses.plain import plain_distill_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", default=".cache/bench-temperature")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    t = a.temperature
    out = Path(a.work) / f"top{a.top_k}-t{t:g}-{a.tokens}"
    precompute(PrecomputeConfig(teacher=a.teacher, data=[a.data], out=str(out), seq_len=a.seq_len, top_k=a.top_k,
                                temperatures=[1.0, t], max_tokens=a.tokens, cross_document_attention=True,
                                batch_size=4, device="cpu", dtype="float32", progress=False))
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32).eval()
    sums: dict[str, float] = {}
    n = 0
    for shard in open_dataset(out).shards:
        ids = torch.from_numpy(shard.column("input_ids").astype(np.int64))
        mask = torch.from_numpy(shard.column("loss_mask").astype(bool))
        labels = torch.from_numpy(shard.column("labels").astype(np.int64)).masked_fill(~mask, -100).flatten()
        top_ids, top_lp = (torch.from_numpy(x).flatten(0, 1) for x in shard.sparse_targets("topk"))
        log_norm = torch.from_numpy(shard.log_norm(t)).flatten()
        with torch.no_grad():
            for rows in torch.split(torch.arange(len(ids)), 4):
                z_t = teacher(ids[rows]).logits.flatten(0, 1)  # (N, V)
                z_s = student(ids[rows]).logits.flatten(0, 1)
                pos = torch.cat([torch.arange(r * a.seq_len, (r + 1) * a.seq_len) for r in rows.tolist()])
                lab = labels[pos]
                k = int((lab != -100).sum())
                ways = {"full vocabulary (online)": dict(teacher_logits=z_t, tail="tail")}
                for tail in ("tail", "uniform"):
                    ways[f"top-{a.top_k} + stored log-normalizer, --tail {tail}"] = dict(teacher_log_norm=log_norm[pos], tail=tail)
                for tail in ("tail", "renormalize", "uniform"):
                    ways[f"top-{a.top_k}, approximation --tail {tail}"] = dict(tail=tail)
                for name, kw in ways.items():
                    tail = kw.pop("tail")
                    sparse = {} if "teacher_logits" in kw else dict(teacher_ids=top_ids[pos], teacher_logprobs=top_lp[pos])
                    res = plain_distill_loss(z_s, lab, LossConfig(alpha=0.0, temperature=t, tail=tail), **sparse, **kw)
                    sums[name] = sums.get(name, 0.0) + float(res.kd) * k
                n += k
    print(f"| way (T = {t:g}, {n} positions) | forward KL x T^2 |")
    print("| --- | --- |")
    for name, total in sums.items():
        print(f"| {name} | {total / n:.4f} |")


if __name__ == "__main__":
    main()
