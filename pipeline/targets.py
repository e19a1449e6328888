"""Teacher logits → what is stored per position. Pure tensor functions on the teacher's device; no I/O.

Called by `pipeline.precompute` once per batch. Log-softmax and top-k run in float32 whatever the model dtype, and only
the k values per position leave the device.
"""

from __future__ import annotations

import math

import torch

LOGPROB_DTYPE = torch.float16  # stored precision of top-k log-probs; fidelity is measured against it
# The reconstruction KL needs several more passes over the full vocabulary; measured on every 8th position (t % 8 == 0
# of each window) it costs an eighth of that, and a sample of thousands of positions per shard is plenty for a mean.
FIDELITY_STRIDE = 8


def topk_targets(logits: torch.Tensor, labels: torch.Tensor, k: int, logprob_bits: int | None = None,
                 rows_per_chunk: int | None = None, fidelity_stride: int = FIDELITY_STRIDE,
                 log_norm_temperatures: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
    """Top-k log-probs (normalized over the full vocabulary at temperature 1) and the label's log-prob.

    logits: (B, T, V) any float dtype; labels: (B, T) int64.
    Returns topk_ids (B, T, k) int64 sorted by probability, topk_logprobs (B, T, k) float32, target_logprob (B, T)
    float32, and two fidelity figures per position, measured on what is stored (float16, or the quantized values when
    `logprob_bits` is given, which also returns topk_q / topk_hi / topk_lo of the compact encoding): topk_mass (B, T) =
    sum of the stored probabilities, and recon_kl (B, ceil(T / fidelity_stride)) = KL(teacher || reconstruction) at
    positions 0, stride, 2*stride, ... of each window, the reconstruction being the
    stored head plus the tail mass spread evenly over the other V - k ids (the maximum-entropy reading of what is stored).
    With `log_norm_temperatures` (T other than 1), also log_norm (B, T, n) float32 = log sum_v p_v^(1/T) per temperature,
    from the unrounded float32 log-probs, so a trainer can temper the stored top-k exactly (tempered log-prob of a
    stored id = log p_i / T - log_norm; tempered tail = 1 minus their sum).
    Rows are processed in chunks so the float32 copy of the logits stays bounded.
    """
    B, T, V = logits.shape
    step = rows_per_chunk or max(1, (1 << 28) // max(1, T * V * 4))  # ~256 MB of float32 per chunk
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, B, step):
        lp = logits[start : start + step].float().log_softmax(dim=-1)  # (b, T, V)
        out = {"target_logprob": lp.gather(-1, labels[start : start + step, :, None]).squeeze(-1)}
        if k > 0 and log_norm_temperatures:
            out["log_norm"] = torch.stack([torch.logsumexp(lp / t, dim=-1) for t in log_norm_temperatures], -1)  # (b, T, n)
        if k > 0:
            top_lp, top_ids = lp.topk(k, dim=-1, sorted=True)  # (b, T, k)
            out |= {"topk_ids": top_ids, "topk_logprobs": top_lp}
            if logprob_bits is None:
                stored = top_lp.to(LOGPROB_DTYPE).float()
            else:
                qz = quantize_logprobs(top_lp, logprob_bits)
                stored = qz.pop("topk_stored")
                out |= qz
            mass = stored.exp().sum(-1)  # (b, T)
            f = slice(None, None, fidelity_stride)
            out |= {"topk_mass": mass, "recon_kl": _topk_recon_kl(lp[:, f], top_ids[:, f], top_lp[:, f], stored[:, f], mass[:, f])}
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


def quantize_logprobs(top_lp: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Compact encoding of sorted top-k log-probs (B, T, K): per position, the range [lo, hi] = [rank-K, rank-1] values
    in float16 and each value as an integer q in [0, 2**bits - 1] on a uniform grid of that range (log domain: the
    error in KL is about mass * step**2 / 24, so a few bits suffice). The ends are rounded to float16 outwards (hi up,
    lo down), so every value lies inside the stored range and its error is at most half a step (plus float32 rounding)
    at every bit width; rounded to nearest, an end could miss by half a float16 ulp, 1.5 steps at 10 bits.
    Returns topk_q (B, T, K) int32, topk_hi/topk_lo (B, T) float16, and the dequantized values (B, T, K)
    float32 that the reader will see (used for the fidelity figures).
    """
    levels = (1 << bits) - 1
    hi = _half_rounded(top_lp[..., 0], up=True)  # (B, T)
    lo = _half_rounded(top_lp[..., -1], up=False)
    hi32, lo32 = hi.float()[..., None], lo.float()[..., None]
    span = lo32 - hi32  # <= 0
    safe = torch.where(span < 0, span, torch.full_like(span, -1.0))
    q = torch.where(span < 0, ((top_lp - hi32) / safe * levels).round(), torch.zeros_like(top_lp)).clamp(0, levels)
    deq = hi32 + (lo32 - hi32) * (q / levels)
    return {"topk_q": q.to(torch.int32), "topk_hi": hi, "topk_lo": lo, "topk_stored": deq}


def _half_rounded(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 x -> float16 at or above x (`up`) or at or below it: the nearest one, else its neighbour that way."""
    h = x.half()
    wrong = h.float() < x if up else h.float() > x
    toward = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(h, toward), h)


def sampled_targets(logits: torch.Tensor, n: int, temperature: float, generator: torch.Generator | None = None,
                    uniforms: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Draw `n` tokens per position from the teacher (at `temperature`) and keep the unique ids with their counts.

    counts / n is an unbiased estimate of the sampling distribution q; at temperature 1, q is the teacher p. Otherwise
    each id also gets log(p/q) (importance weight), so counts / n * p / q is unbiased for p.
    Draws are inverse-CDF lookups of `uniforms` (B*T, n) in [0, 1) (drawn from `generator` when not given), so a
    position's draws depend only on its own uniforms: the chunked head (pipeline.head) gets the same values.
    logits: (B, T, V). Returns sample_ids (B, T, n) int64 (unique ids ascending, then padding), sample_counts (B, T, n)
    int32 (0 in padding), sample_n (B, T) unique ids per position, sample_logweights (B, T, n) float32, and the fidelity
    figures sample_mass (B, T) = true teacher mass of the drawn ids and sample_rkl (B, T) = KL(estimate || teacher).
    """
    B, T, V = logits.shape
    lp = logits.float().log_softmax(-1)  # (B, T, V)
    lq = lp if temperature == 1.0 else (logits.float() / temperature).log_softmax(-1)
    if uniforms is None:
        uniforms = torch.rand(B * T, n, generator=generator, device=logits.device, dtype=torch.float64)
    cdf = lq.reshape(-1, V).double().exp().cumsum(-1)  # (P, V) float64: exact enough at any vocabulary size
    u = uniforms.to(cdf.device, torch.float64) * cdf[:, -1:]  # (P, n)
    draws = torch.searchsorted(cdf, u, right=True).clamp_max(V - 1)  # (P, n) id whose CDF interval holds u
    sorted_ids, _ = draws.sort(-1)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]  # (P, n) start of a run of one id
    slot = first.cumsum(-1) - 1  # (P, n) which unique slot each draw falls in
    counts = torch.zeros_like(sorted_ids).scatter_add_(1, slot, torch.ones_like(sorted_ids))  # (P, n)
    ids = torch.zeros_like(sorted_ids).scatter_(1, slot, sorted_ids)
    n_unique = first.sum(-1)  # (P,)
    valid = counts > 0
    p_at = lp.reshape(-1, V).gather(1, ids)  # (P, n) log p of each kept id
    q_at = lq.reshape(-1, V).gather(1, ids)
    logw = torch.where(valid, p_at - q_at, torch.zeros_like(p_at))
    est = torch.where(valid, (counts.float() / n).log() + logw, torch.full_like(p_at, -float("inf")))
    mass = torch.where(valid, p_at.exp(), torch.zeros_like(p_at)).sum(-1)
    rkl = torch.where(valid, est.exp() * (est - p_at), torch.zeros_like(p_at)).sum(-1)
    shape = (B, T, n)
    return {
        "sample_ids": ids.reshape(shape), "sample_counts": counts.to(torch.int32).reshape(shape),
        "sample_n": n_unique.reshape(B, T), "sample_logweights": logw.reshape(shape),
        "sample_mass": mass.reshape(B, T), "sample_rkl": rkl.reshape(B, T),
    }


def batch_generator(seed: int, first_window: int, device: torch.device) -> torch.Generator:
    """A generator seeded by the batch's first window, so sampling depends only on what is sampled, not on the order
    shards are processed in: a resumed or multi-rank run draws exactly the same tokens."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + first_window) % (2**63))
    return g
