"""Held-out evaluation of a student against a logit dataset: `distill eval` and `distill train --eval-data`.

Metrics, over positions that have a next token:
- ce (nats/token) and perplexity = exp(ce), against the real next token;
- kl: KL(teacher || student) over the stored buckets, i.e. the teacher's top-k ids plus one tail bucket holding the rest
  of the mass on each side (the student's tail is 1 - its probability on those ids);
- top1_agreement: the student's argmax equals the teacher's most likely stored token (topk_ids[..., 0] for top-k);
- ece: expected calibration error of the student's top-1 confidence against the real next token, 10 equal-width bins;
- accuracy: the student's argmax equals the real next token.
The math is in pure functions over sums (`metric_sums`, `finish_metrics`) so batches and DDP ranks just add them up.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .config import EvalConfig
from .data import IGNORE_INDEX, WindowReader, check_batch, make_loader, stored_target_kind
from .student import position_kwargs

ECE_BINS = 10


def metric_sums(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None = None,
                teacher_logprobs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums of every metric over the valid positions of one chunk.

    logits (N, V) any float; labels (N,) with IGNORE_INDEX where there is no next token; teacher_ids (N, K) int64 and
    teacher_logprobs (N, K) (log-probs over the full vocabulary at T = 1, -inf allowed), or None.
    """
    valid = labels != IGNORE_INDEX  # (N,)
    logp = torch.log_softmax(logits[valid].float(), dim=-1)  # (n, V)
    labels = labels[valid]  # (n,)
    conf, pred = logp.max(dim=-1)  # (n,)
    conf = conf.exp()
    correct = (pred == labels).float()  # (n,)
    bins = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1)  # (n,) bin i holds confidences in [i/10, (i+1)/10)
    sums = {
        "tokens": torch.tensor(float(labels.numel()), device=logits.device),
        "ce": -logp.gather(1, labels[:, None]).sum(),
        "correct": correct.sum(),
        "bin_count": torch.bincount(bins, minlength=ECE_BINS).float(),
        "bin_conf": torch.bincount(bins, weights=conf, minlength=ECE_BINS),
        "bin_correct": torch.bincount(bins, weights=correct, minlength=ECE_BINS),
        "kl_tokens": torch.zeros((), device=logits.device),
        "kl": torch.zeros((), device=logits.device),
        "agree": torch.zeros((), device=logits.device),
    }
    if teacher_ids is not None:
        ids = teacher_ids[valid]  # (n, K)
        t_lp = teacher_logprobs[valid].float()  # (n, K)
        slot = torch.isfinite(t_lp)  # (n, K) False for padded slots (sampled targets)
        s_lp = logp.gather(1, ids)  # (n, K)
        p = torch.where(slot, t_lp.exp(), 0.0)
        head = torch.where(p > 0, p * (t_lp - s_lp), 0.0).sum(-1)  # (n,)
        tiny = torch.finfo(torch.float32).tiny
        p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)  # (n,) float16 storage can overshoot 1 slightly
        covers_vocab = slot.sum(-1) >= logp.shape[-1]  # (n,) every id stored (distinct): 1 - sum is rounding, not a tail
        p_tail = torch.where(covers_vocab, 0.0, p_tail)
        s_tail = (1.0 - torch.where(slot, s_lp.exp(), 0.0).sum(-1)).clamp(min=tiny)  # (n,)
        tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=tiny).log() - s_tail.log()), 0.0)
        sums["kl_tokens"] = sums["tokens"].clone()
        sums["kl"] = (head + tail).sum()
        teacher_top1 = ids.gather(1, t_lp.argmax(-1, keepdim=True)).squeeze(1)  # (n,) first of the stored ids for top-k
        sums["agree"] = (pred == teacher_top1).float().sum()
    return sums


def add_sums(total: dict | None, part: dict) -> dict:
    return dict(part) if total is None else {k: total[k] + part[k] for k in total}


def finish_metrics(sums: dict) -> dict:
    """Means from accumulated sums: ce, perplexity, kl, top1_agreement, ece, accuracy, tokens (floats; None if undefined)."""
    s = {k: (v.double().cpu() if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float64)) for k, v in sums.items()}
    n = float(s["tokens"])
    if n == 0:
        return {"tokens": 0, "ce": None, "perplexity": None, "kl": None, "top1_agreement": None, "ece": None, "accuracy": None}
    ce = float(s["ce"]) / n
    n_kl = float(s["kl_tokens"])
    return {
        "tokens": int(n),
        "ce": ce,
        "perplexity": math.exp(min(ce, 700.0)),
        "kl": float(s["kl"]) / n_kl if n_kl else None,
        "top1_agreement": float(s["agree"]) / n_kl if n_kl else None,
        "ece": float((s["bin_conf"] - s["bin_correct"]).abs().sum()) / n,
        "accuracy": float(s["correct"]) / n,
    }


def logits_chunks(model, input_ids: torch.Tensor, fused: bool, chunk_size: int, position_ids: torch.Tensor | None = None):
    """The student's logits (n, V) chunk by chunk over the B*T positions, without holding (B*T, V) when fused.
    position_ids (B, T): packed examples stay apart (`trainer.student.position_kwargs`)."""
    pos = position_kwargs(position_ids)
    if fused:
        hidden = model.base_model(input_ids=input_ids, use_cache=False, **pos).last_hidden_state.flatten(0, 1)  # (N, D)
        emb = model.get_output_embeddings()
        for start in range(0, hidden.shape[0], chunk_size):
            yield start, F.linear(hidden[start : start + chunk_size], emb.weight, emb.bias)  # (n, V)
    else:
        logits = model(input_ids=input_ids, use_cache=False, **pos).logits.flatten(0, 1)  # (N, V)
        for start in range(0, logits.shape[0], chunk_size):
            yield start, logits[start : start + chunk_size]


@torch.no_grad()
def evaluate_batches(model, batches, device: torch.device, amp_dtype: torch.dtype | None, fused: bool,
                     chunk_size: int = 1024, max_batches: int | None = None) -> dict | None:
    """Accumulated metric sums of `model` over `batches` (reader dicts); None when there were none."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    total = None
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = check_batch(batch)
            input_ids = batch["input_ids"].to(device)  # (B, T)
            labels = batch["labels"].flatten().to(device)  # (N,)
            ids, lps = batch.get("teacher_ids"), batch.get("teacher_logprobs")
            if ids is not None:
                ids, lps = ids.flatten(0, 1).to(device), lps.flatten(0, 1).to(device)  # (N, K)
            with autocast:
                position_ids = batch["position_ids"].to(device) if "position_ids" in batch else None  # (B, T)
                for start, logits in logits_chunks(model, input_ids, fused, chunk_size, position_ids):
                    end = start + logits.shape[0]
                    part = metric_sums(logits, labels[start:end], None if ids is None else ids[start:end],
                                       None if lps is None else lps[start:end])
                    total = add_sums(total, part)
    finally:
        model.train(was_training)
    return total


def evaluate(cfg: EvalConfig) -> dict:
    """`distill eval`: metrics of a student on a held-out dataset (refusing one it cannot be compared on)."""
    from pipeline.common.errors import UserError
    from pipeline.format import open_dataset

    from .model_card import model_folder
    from .student import compatibility_problems, fused_blocker, load_pretrained, load_tokenizer
    from .distributed import resolve_device_dtype

    ds = open_dataset(cfg.data, **cfg.data_options())  # a URL: shards fetched ahead into the local cache
    device, amp_dtype = resolve_device_dtype(cfg.device, cfg.dtype, local_rank=0)
    student = model_folder(cfg.student)  # a run folder's RUN/model/
    model = load_pretrained(student, cfg.trust_remote_code, what=f"--student {cfg.student}")
    problems = compatibility_problems(model, load_tokenizer(student, cfg.trust_remote_code), ds)
    if problems:
        raise UserError("; ".join(problems))
    model.to(device)
    reader = WindowReader(ds, cfg.batch_size, shuffle=False, epochs=1, targets=stored_target_kind(ds))
    sums = evaluate_batches(model, make_loader(reader, 0), device, amp_dtype, fused=fused_blocker(model) is None,
                            chunk_size=cfg.chunk_size, max_batches=cfg.max_batches)
    if sums is None:
        raise UserError(f"--data {cfg.data} holds no windows to evaluate on")
    return finish_metrics(sums)
