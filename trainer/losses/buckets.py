"""Teacher targets as buckets, and the divergences over them. Shared by `plain` and `fused`, so both compute the same math.

A sparse target stores, per position, K token ids and the teacher's log-probabilities there (normalized over the full
vocabulary, at T = 1 for stored top-k: see Temperature; padded slots are -inf). The vocabulary is split into buckets: the K stored ids, plus what the
`tail` mode says about the rest:

- `tail`: one ghost bucket. Teacher mass r = 1 - sum(p_k); student mass = 1 - sum(q_k), computed as
  log1mexp(logsumexp(s_k)) from the gathered log-probs, so no second pass over the vocabulary is needed.
- `renormalize`: the teacher's stored probabilities rescaled to sum to 1 and its tail set to 0; then the same buckets
  as `tail`. Forward KL becomes sum p~_k (log p~_k - s_k) with s the student's FULL-vocab log-softmax, which also pushes
  the student's mass into the stored ids (DistillKit's sparse KL). Reverse KL is infinite where the teacher has 0 mass and
  the student does not, so (here and whenever a teacher's tail is 0) reverse KL restricts the student to the teacher's
  support: the student is renormalized over the stored ids. JSD stays finite with a zero-mass teacher bucket, so it keeps
  the student's ghost bucket, which (like forward KL) pushes the student's mass into the stored ids.
- `uniform`: each of the M = V - K ids not stored gets r / M. Its terms need sums over the non-stored ids; they are taken
  as one full-vocab elementwise sum over the student's log-probs ("sweep", from the same pass as the log-softmax) minus the
  same terms at the stored ids.

Sampled targets go through the same code. With draws at τ = 1 they are log(count/N) (sums to 1, no tail); with draws
at τ ≠ 1 the capture adds importance weights log p - log q_τ, so log(count/N · p/q_τ) is an unbiased estimate of the T = 1
teacher that need not sum to 1. Either way they estimate the teacher at T = 1 (`teacher_temperature = 1`), and the three
modes coincide except that reverse KL is restricted to the sampled ids.

Temperature. The student's logits are divided by T (exact). Stored targets are log-probs at `teacher_temperature` T0
(1 for stored top-k and for weighted sample estimates); tempering raises every probability to T0/T and renormalizes.
The ratios between stored ids are always exact; the normalizer needs the tail's individual probabilities, which are not
stored. So there are two ways:
- exact, with `log_norm` (n,) = log sum_v p_v^(1/T) over the FULL vocabulary, one float per position per temperature
  stored at capture (`tempered_log_norm`): the tempered log-prob of a stored id is log p_i / T - log_norm and the tempered
  tail mass is 1 minus their sum (`tempered_teacher_logprobs`). Needs T0 = 1 and exact T = 1 log-probs (top-k), not
  sample estimates (E[p̂^(1/T)] ≠ p^(1/T)). Then `tail` is the exact tempered ghost bucket, `uniform` spreads the exact
  tempered tail mass evenly over the ids not stored, `renormalize` is unchanged (it never used the tail);
- approximate, without it:
  - `renormalize`: exact (the tempered teacher conditioned on the stored ids);
  - `uniform`: exact under its own assumption (M ids of r/M each give M (r/M)^(1/T));
  - `tail`: the ghost bucket is tempered as one token, r^(1/T). The true tempered tail sum_j p_j^(1/T) lies between
    r^(1/T) and M^(1-1/T) r^(1/T) for T > 1, so the ghost is under-weighted for T > 1 (over-weighted for T < 1); exact at
    T = 1. On a real teacher whose top-64 held 63% of the mass, forward KL at T = 2 came out 6.6 instead of 0.50
    (issue 15); use it only when the log-normalizer was not captured.
  - sampled targets: the estimates raised to 1/T and renormalized over the drawn ids: a plug-in estimate of the tempered
    teacher, consistent as N grows but biased (by O(1/N)) at every N. The unbiased way to get tempered sampled targets
    is to draw at τ = T and pass the unweighted log(count/N) with `teacher_temperature = T`: E[count/N] = softmax(z/T)
    exactly, and the loss then uses them as they are (exponent T0/T = 1).
Dense targets (full teacher logits) are tempered exactly: log_softmax(teacher_logits / T).

Coverage. A row whose valid stored ids number V (they are distinct, as top-k and sampled ids are) covers the vocabulary:
it has no tail bucket on either side, whatever the float rounding of 1 - sum(p) says, so k = V equals the dense value.
"""

import math
from typing import NamedTuple

import torch

from .config import TAIL_MODES

TAIL_EPS = 1e-6
"""Mass below which a tail is float rounding, not signal: a teacher tail 1 - sum(p_k) under it counts as 0 (it is 1e-7
noise when the stored ids cover the vocabulary), and, when some ids are not stored, the student's ghost bucket mass is
floored at it because 1 - sum(q_k) computed in float32 cannot resolve less; without the floor log(ghost) and its
gradient would explode. (So a student ghost truly under 1e-6 reads as 1e-6 and gets no gradient there.)"""

_LOG_HEAD_MAX = math.log1p(-TAIL_EPS)  # cap on log(sum q_k), i.e. student ghost mass >= TAIL_EPS


class TeacherBuckets(NamedTuple):
    """The teacher's tempered distribution over the buckets of one batch of positions (constants: no gradient)."""

    head_lp: torch.Tensor  # (n, K) tempered log-probs at the stored ids; -inf at padded slots
    rest_lp: torch.Tensor  # (n,) tail/renormalize: log-mass of the ghost bucket; uniform: log-prob of EACH non-stored id
    valid: torch.Tensor  # (n, K) bool: slot holds a stored id
    has_rest: torch.Tensor  # (n,) bool: the teacher puts mass outside the stored ids (rest_lp > -inf)
    row_ok: torch.Tensor  # (n,) bool: the position has at least one stored id (others contribute no KD)
    covers_vocab: torch.Tensor  # (n,) bool: the stored ids are the whole vocabulary: no tail bucket on either side
    tail: str


def check_targets(n_positions, vocab_size, teacher_ids, teacher_logprobs, teacher_logits, teacher_log_norm=None,
                  teacher_temperature=1.0):
    """Validate target shapes; return "sparse", "dense" or None (pure CE). Raises ValueError naming the problem."""
    sparse = teacher_ids is not None or teacher_logprobs is not None
    if not teacher_temperature > 0.0:
        raise ValueError(f"teacher_temperature={teacher_temperature!r} must be > 0")
    if sparse and teacher_logits is not None:
        raise ValueError("pass either sparse targets (teacher_ids, teacher_logprobs) or dense teacher_logits, not both")
    if not sparse and (teacher_log_norm is not None or teacher_temperature != 1.0):
        raise ValueError("teacher_log_norm and teacher_temperature describe sparse targets (teacher_ids, "
                         "teacher_logprobs); dense teacher_logits are tempered exactly without them")
    if teacher_log_norm is not None:
        if teacher_temperature != 1.0:
            raise ValueError(f"teacher_log_norm tempers log-probs stored at T = 1, but teacher_temperature="
                             f"{teacher_temperature!r}; pass one or the other")
        if teacher_log_norm.numel() != n_positions:
            raise ValueError(f"teacher_log_norm {tuple(teacher_log_norm.shape)} must hold one value per position "
                             f"(N={n_positions})")
    if sparse:
        if teacher_ids is None or teacher_logprobs is None:
            raise ValueError("sparse targets need both teacher_ids and teacher_logprobs")
        if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() < 1:
            raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                             f"{tuple(teacher_logprobs.shape)} must have the same shape (..., K)")
        if teacher_ids.numel() // max(teacher_ids.shape[-1], 1) != n_positions:
            raise ValueError(f"sparse targets have {teacher_ids.numel() // max(teacher_ids.shape[-1], 1)} positions, "
                             f"labels have {n_positions}")
        return "sparse"
    if teacher_logits is not None:
        if teacher_logits.shape[-1] != vocab_size or teacher_logits.numel() != n_positions * vocab_size:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be (N={n_positions}, V={vocab_size})")
        return "dense"
    return None


def tempered_log_norm(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The float to store per position and temperature T: log sum_v p_v^(1/T) over the full vocabulary, p = softmax(z).

    teacher_logits (..., V) raw logits z -> (...,), computed in float32 (float64 stays float64). Equal to
    logZ_T - logZ_1 / T with logZ_T = logsumexp(z / T); 0 at T = 1 (so nothing needs storing for T = 1); in
    [0, (1 - 1/T) log V] for T > 1. Store it as float32, from the unrounded logits: an error d in it scales every tempered
    probability by exp(-d), and float16 near 6 (T = 2, V = 150k) would give d ~ 0.002. The stored log-probs may be
    float16 or quantized: their error reaches the tempered log-probs divided by T.
    """
    lp = torch.log_softmax(teacher_logits.detach().to(compute_dtype(teacher_logits.dtype)), dim=-1)  # (..., V)
    return torch.logsumexp(lp / temperature, dim=-1)


def log_norm_from_partitions(log_partition_1: torch.Tensor, log_partition_t: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """Same value from the two log-partitions logZ_1 = logsumexp(z) and logZ_T = logsumexp(z / T), each (...,)."""
    return log_partition_t - log_partition_1 / temperature


def tempered_teacher_logprobs(logprobs: torch.Tensor, log_norm: torch.Tensor,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tempered teacher at the stored ids, from stored T = 1 log-probs and the stored `tempered_log_norm`.

    logprobs (..., K): log p_i = z_i - logZ_1 at the stored ids, -inf at padded slots; log_norm (...,):
    log sum_v p_v^(1/T). Returns (tempered log-probs (..., K) = log p_i / T - log_norm, i.e. z_i / T - logZ_T;
    tempered tail log-mass (...,) = log(1 - sum_i exp(tempered_i)), -inf when the stored ids hold all of it up to
    rounding). Computed in the dtype of `logprobs` (float32 at least recommended).
    """
    head = logprobs / temperature - log_norm.to(logprobs.dtype)[..., None]  # (..., K)
    head_lse = torch.logsumexp(head, dim=-1)  # (...,) tempered mass on the stored ids, log
    rest = log1mexp(head_lse.clamp(max=-torch.finfo(head.dtype).tiny))  # (...,)
    return head, torch.where(head_lse < 0, rest, -math.inf)


def sparse_teacher_buckets(teacher_logprobs: torch.Tensor, *, tail: str, temperature: float, vocab_size: int,
                           log_norm: torch.Tensor | None = None, teacher_temperature: float = 1.0) -> TeacherBuckets:
    """Teacher buckets from stored log-probs (n, K) (full-vocab normalized at `teacher_temperature`, -inf = padded slot),
    in float32/64, tempered to `temperature`: exactly with `log_norm` (n,) (see `tempered_teacher_logprobs`), else with
    the approximations of the module docstring."""
    if tail not in TAIL_MODES:
        raise ValueError(f"tail={tail!r} is not one of {', '.join(TAIL_MODES)}")
    lp = teacher_logprobs.detach()
    valid = lp > -math.inf  # (n, K); NaN counts as padded too
    row_ok = valid.any(1)  # (n,)
    # A position without any stored id gets a dummy certain id in slot 0 so every formula stays finite; its KD is zeroed.
    valid[:, 0] |= ~row_ok
    lp = torch.where(valid, lp, -math.inf)
    lp[:, 0] = torch.where(row_ok, lp[:, 0], 0.0)
    n_rest = (vocab_size - valid.sum(1)).to(lp.dtype)  # (n,) ids not stored
    covers_vocab = row_ok & (n_rest <= 0)  # (n,)

    if log_norm is None:
        scale = teacher_temperature / temperature  # probabilities are raised to T0 / T
        head_t = lp * scale  # (n, K) exact up to the normalizer
        rest_mass = -torch.expm1(torch.logsumexp(lp, 1))  # (n,) tail at T0; a tiny negative from fp16 rounding -> none
        has_rest = (rest_mass > TAIL_EPS) & ~covers_vocab
        if tail == "uniform":
            per_id = (rest_mass.log() - n_rest.log()) * scale  # each non-stored id: (r / M)^(T0/T)
            rest_total = n_rest.log() + per_id
        else:
            per_id = rest_total = rest_mass.log() * scale  # the ghost tempered as one token: r^(T0/T)
    else:
        log_norm = log_norm.detach().reshape(-1)  # (n,); positions without a next token may hold anything: keep it finite
        log_norm = torch.where(torch.isfinite(log_norm), log_norm, 0.0)
        head_t, rest_total = tempered_teacher_logprobs(lp, log_norm, temperature)  # exact
        has_rest = (rest_total > math.log(TAIL_EPS)) & ~covers_vocab
        per_id = rest_total - n_rest.log() if tail == "uniform" else rest_total
    if tail == "renormalize":
        has_rest = torch.zeros_like(has_rest)
    per_id = torch.where(has_rest, per_id, -math.inf)
    rest_total = torch.where(has_rest, rest_total, -math.inf)
    log_z = torch.logaddexp(torch.logsumexp(head_t, 1), rest_total)  # (n,) 1 up to rounding in the exact case
    return TeacherBuckets(head_t - log_z[:, None], per_id - log_z, valid, has_rest, row_ok, covers_vocab, tail)


def divergence_terms(kind: str, teacher_lp: torch.Tensor, student_lp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-bucket contribution to the divergence, elementwise (broadcasting); summing over buckets gives the divergence.

    forward_kl: p (log p - log q); reverse_kl: q (log q - log p); jsd: beta p (log p - log m) + (1-beta) q (log q - log m)
    with m = beta p + (1-beta) q. A bucket with teacher log-prob -inf gives 0 for forward and reverse KL (reverse KL is
    infinite there: callers exclude such buckets from the student's support) and the finite limit for JSD.
    """
    has = teacher_lp > -math.inf
    t = torch.where(has, teacher_lp, 0.0)  # finite stand-in, so no 0 * inf in values or gradients
    if kind == "forward_kl":
        return torch.where(has, t.exp() * (t - student_lp), 0.0)
    if kind == "reverse_kl":
        return torch.where(has, student_lp.exp() * (student_lp - t), 0.0)
    if kind == "jsd":
        m = torch.logaddexp(teacher_lp + math.log(beta), student_lp + math.log1p(-beta))
        return torch.where(has, beta * t.exp() * (t - m), 0.0) + (1 - beta) * student_lp.exp() * (student_lp - m)
    raise ValueError(f"loss={kind!r} is not one of forward_kl, reverse_kl, jsd")


def divergence_grad(kind: str, teacher_lp: torch.Tensor, student_lp: torch.Tensor, beta: float) -> torch.Tensor:
    """d divergence_terms / d student_lp, elementwise, shaped like student_lp (used by the fused path's full-vocab parts)."""
    has = teacher_lp > -math.inf
    t = torch.where(has, teacher_lp, 0.0)
    if kind == "forward_kl":
        return torch.where(has, -t.exp(), 0.0).expand_as(student_lp).clone()
    if kind == "reverse_kl":
        return torch.where(has, student_lp.exp() * (student_lp - t + 1.0), 0.0)
    if kind == "jsd":  # the teacher-side term's dependence on m cancels against the student side's
        m = torch.logaddexp(teacher_lp + math.log(beta), student_lp + math.log1p(-beta))
        return (1 - beta) * student_lp.exp() * (student_lp - m)
    raise ValueError(f"loss={kind!r} is not one of forward_kl, reverse_kl, jsd")


def uniform_sweep(kind: str, beta: float, rest_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """(n,) sum over the FULL vocabulary of the terms of a uniform tail (teacher log-prob rest_lp (n,) at every id)
    against the student's log-probs (n, V); `sparse_kd` subtracts the stored ids' share."""
    return divergence_terms(kind, rest_lp[:, None], student_lp, beta).sum(1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012), NaN-free gradients."""
    near_zero = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    b = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, a, b)


def sparse_kd(kind: str, beta: float, student_head: torch.Tensor, teacher: TeacherBuckets,
              sweep: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) divergence per position (not yet scaled by T^2).

    student_head (n, K): the student's tempered full-vocab log-probs gathered at the stored ids. sweep (n,): for the
    uniform mode, `uniform_sweep` of the same student log-probs. Differentiable w.r.t. student_head and sweep.
    """
    valid = teacher.valid
    head_lse = torch.logsumexp(student_head.masked_fill(~valid, -math.inf), 1)  # (n,) log student mass on stored ids
    head = student_head
    if kind == "reverse_kl":  # restrict the student to the teacher's support where the teacher has no tail
        head = student_head - torch.where(teacher.has_rest, 0.0, head_lse)[:, None]
    total = torch.where(valid, divergence_terms(kind, teacher.head_lp, head, beta), 0.0).sum(1)  # (n,)
    if teacher.tail == "uniform":
        if sweep is None:
            raise ValueError("the uniform tail mode needs the full-vocab sweep (uniform_sweep)")
        at_stored = divergence_terms(kind, teacher.rest_lp[:, None], student_head, beta)  # (n, K)
        rest = sweep - torch.where(valid, at_stored, 0.0).sum(1)
    else:
        ghost = log1mexp(head_lse.clamp(max=_LOG_HEAD_MAX))  # (n,) student log-mass outside the stored ids
        rest = divergence_terms(kind, teacher.rest_lp, ghost, beta)
    if kind == "reverse_kl":
        rest = torch.where(teacher.has_rest, rest, 0.0)
    rest = torch.where(teacher.covers_vocab, 0.0, rest)  # no ids outside the stored ones: no floored student ghost
    return torch.where(teacher.row_ok, total + rest, 0.0)


def dense_teacher_logprobs(teacher_logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """(n, V) exactly tempered teacher log-probs from full-vocab logits."""
    return torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # the teacher is a constant


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 math whatever the model dtype; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
