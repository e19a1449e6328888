"""Reference loss on materialized student logits (N, V): plain autograd, easy to read, the check for the fused path.

It holds several (N, V) float32 tensors at once, so `trainer.train` uses `fused.fused_distill_loss` whenever the model
exposes its output embedding; this path is for models that do not, and for tests.
"""

import torch

from .buckets import (check_targets, compute_dtype, dense_teacher_logprobs, divergence_terms, sparse_kd,
                      sparse_teacher_buckets, uniform_sweep)
from .config import LossConfig, LossOutput


def plain_distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, *,
                       teacher_ids: torch.Tensor | None = None, teacher_logprobs: torch.Tensor | None = None,
                       teacher_logits: torch.Tensor | None = None, teacher_log_norm: torch.Tensor | None = None,
                       teacher_temperature: float = 1.0) -> LossOutput:
    """alpha * CE + (1 - alpha) * T^2 * KD, each averaged over the valid positions.

    student_logits (N, V) (or (B, T, V)), any float dtype; labels (N,) int64, cfg.ignore_index where masked.
    Sparse targets: teacher_ids (N, K) int64, teacher_logprobs (N, K) (log-probs over the full vocabulary at
    `teacher_temperature`, 1 for stored top-k; -inf = padded slot; the valid ids of a row are distinct).
    teacher_log_norm (N,) (or (B, T)), optional: log sum_v p_v^(1/T) at T = cfg.temperature (`buckets.tempered_log_norm`,
    stored at capture); with it the tempered targets and tail are exact, without it T != 1 approximates them. Only for
    exact stored log-probs (top-k), never for sampled estimates (the tempered estimate would be biased and its tail
    meaningless). Non-finite values count only at masked positions (they are replaced by 0).
    teacher_temperature: the temperature the sparse log-probs are normalized at; sampled targets drawn at tau = T and
    given unweighted as log(count/N) pass T here and are used as they are.
    Dense targets: teacher_logits (N, V). Neither (or alpha == 1): pure CE. See `buckets` for the math.
    """
    cfg.validate()
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)  # (N, V)
    labels = labels.reshape(-1).long()  # (N,); stored ids and labels may come as int32
    n = labels.shape[0]
    if logits.shape[0] != n:
        raise ValueError(f"student_logits have {logits.shape[0]} positions, labels have {n}")
    targets = check_targets(n, vocab, teacher_ids, teacher_logprobs, teacher_logits, teacher_log_norm,
                            teacher_temperature)
    dtype = compute_dtype(logits.dtype)

    valid = labels != cfg.ignore_index  # (N,)
    n_tokens = int(valid.sum())
    safe_labels = labels.masked_fill(~valid, 0)
    log_probs = torch.log_softmax(logits.to(dtype), dim=-1)  # (N, V) at T = 1, shared with KD when T == 1
    ce_pos = -log_probs.gather(1, safe_labels[:, None]).squeeze(1)  # (N,)

    kd_on = targets is not None and cfg.alpha < 1.0
    kd_pos = torch.zeros_like(ce_pos)
    if kd_on:
        t = cfg.temperature
        student = log_probs if t == 1.0 else torch.log_softmax(logits.to(dtype) / t, dim=-1)  # (N, V)
        if targets == "sparse":
            ids = teacher_ids.reshape(n, -1).long()  # (N, K)
            log_norm = None if teacher_log_norm is None else teacher_log_norm.reshape(n).to(dtype)  # (N,)
            teacher = sparse_teacher_buckets(teacher_logprobs.reshape(n, -1).to(dtype), tail=cfg.tail,
                                             temperature=t, vocab_size=vocab, log_norm=log_norm,
                                             teacher_temperature=teacher_temperature)
            sweep = uniform_sweep(cfg.loss, cfg.beta, teacher.rest_lp, student) if cfg.tail == "uniform" else None
            kd_pos = sparse_kd(cfg.loss, cfg.beta, student.gather(1, ids), teacher, sweep)
        else:
            teacher_lp = dense_teacher_logprobs(teacher_logits.reshape(n, vocab), t, dtype)  # (N, V)
            kd_pos = divergence_terms(cfg.loss, teacher_lp, student, cfg.beta).sum(1)
    return combine_terms(ce_pos, kd_pos, valid, n_tokens, cfg, kd_on)


def combine_terms(ce_pos, kd_pos, valid, n_tokens, cfg, kd_on) -> LossOutput:
    """Mask, normalize by the valid-token count (all masked -> 0), scale KD by T^2, mix with alpha."""
    denom = max(n_tokens, 1)
    ce = torch.where(valid, ce_pos, 0.0).sum() / denom
    kd = torch.where(valid, kd_pos, 0.0).sum() * (cfg.temperature ** 2) / denom
    alpha = cfg.alpha if kd_on else 1.0
    loss = alpha * ce + (1.0 - alpha) * kd
    return LossOutput(loss=loss, ce=ce.detach(), kd=kd.detach(), n_tokens=n_tokens)
