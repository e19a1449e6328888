"""Teacher logits → what is stored per position. Pure tensor functions on the teacher's device; no I/O.

Called by `pipeline.precompute` once per batch. Log-softmax and top-k run in float32 whatever the model dtype, and only
the k values per position leave the device.
"""

from __future__ import annotations

import math

import torch

LOGPROB_DTYPE = torch.float16  # stored precision of top-k log-probs; fidelity is measured against it


def topk_targets(logits: torch.Tensor, labels: torch.Tensor, k: int, rows_per_chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Top-k log-probs (normalized over the full vocabulary at temperature 1) and the label's log-prob.

    logits: (B, T, V) any float dtype; labels: (B, T) int64.
    Returns topk_ids (B, T, k) int64 sorted by probability, topk_logprobs (B, T, k) float32, target_logprob (B, T)
    float32, and two fidelity figures per position: topk_mass (B, T) = sum of the stored probabilities (after rounding
    to float16), and recon_kl (B, T) = KL(teacher || reconstruction) where the reconstruction is the stored head plus
    the tail mass spread evenly over the other V - k ids (the maximum-entropy reading of what is stored).
    Rows are processed in chunks so the float32 copy of the logits stays bounded.
    """
    B, T, V = logits.shape
    step = rows_per_chunk or max(1, (1 << 28) // max(1, T * V * 4))  # ~256 MB of float32 per chunk
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, B, step):
        lp = logits[start : start + step].float().log_softmax(dim=-1)  # (b, T, V)
        out = {"target_logprob": lp.gather(-1, labels[start : start + step, :, None]).squeeze(-1)}
        if k > 0:
            top_lp, top_ids = lp.topk(k, dim=-1, sorted=True)  # (b, T, k)
            stored = top_lp.to(LOGPROB_DTYPE).float()
            mass = stored.exp().sum(-1)  # (b, T)
            out |= {"topk_ids": top_ids, "topk_logprobs": top_lp, "topk_mass": mass, "recon_kl": _topk_recon_kl(lp, top_ids, top_lp, stored, mass)}
        for name, t in out.items():
            parts.setdefault(name, []).append(t)
    return {name: torch.cat(ts) for name, ts in parts.items()}


def _topk_recon_kl(lp, top_ids, top_lp, stored, mass) -> torch.Tensor:
    """KL(p || r) with r = stored head probabilities + tail mass spread evenly over the ids not stored.  -> (b, T)"""
    V, k = lp.shape[-1], top_ids.shape[-1]
    p = lp.exp()
    head = (top_lp.exp() * (top_lp - stored)).sum(-1)  # float16 rounding of the head
    if k == V:
        return head
    tail_mass = (1.0 - mass).clamp_min(1e-12)
    log_r_tail = tail_mass.log() - math.log(V - k)  # (b, T)
    # where p underflows to 0 (or a logit is -inf) the term is 0, not nan
    p_tail_terms = torch.where(p > 0, p * (lp - log_r_tail[..., None]), 0.0)  # (b, T, V); head removed below
    tail = p_tail_terms.sum(-1) - p_tail_terms.gather(-1, top_ids).sum(-1)
    return head + tail
