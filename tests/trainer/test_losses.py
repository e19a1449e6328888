"""Tests of trainer.losses: exactness against independent formulas, fused == plain, gradcheck, masking, hidden states."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.losses.buckets import log_norm_from_partitions, tempered_log_norm, tempered_teacher_logprobs
from trainer.losses.config import LOSS_KINDS, TAIL_MODES, LossConfig
from trainer.losses.fused import fused_distill_loss
from trainer.losses.hidden import default_layer_map, hidden_state_loss, make_projections, parse_layer_map
from trainer.losses.plain import plain_distill_loss

KINDS, TAILS = LOSS_KINDS, TAIL_MODES
MODES = TAILS + ("dense",)  # "dense" = full-vocab teacher logits (online teacher)


# --- fixtures: tiny synthetic problems ---------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine thread hand-offs dominate their cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_problem(n=10, d=6, v=17, k=5, dtype=torch.float32, seed=0, masked=(2, 7)):
    """Hidden states, output embedding, bias, labels with some masked, teacher logits and mixed sparse targets:
    even rows top-k (with a tail), odd rows sampled (log(count/n), a variable number of ids, padded with -inf and a
    repeated id)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[list(masked)] = -100
    teacher_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    top = teacher_lp.topk(k, -1)
    ids, lps = top.indices.clone(), top.values.clone()
    for row in range(1, n, 2):  # sampled rows: counts of 8 draws over a few unique ids, no tail
        n_unique = 1 + row % k
        counts = torch.randint(1, 4, (n_unique,), generator=g).double()
        ids[row, :n_unique] = torch.randperm(v, generator=g)[:n_unique]
        lps[row, :n_unique] = (counts / counts.sum()).log()
        ids[row, n_unique:] = ids[row, 0]  # padded slots repeat a valid id: they must still count for nothing
        lps[row, n_unique:] = -math.inf
    cast = dict(dtype=dtype)
    return dict(hidden=hidden.to(**cast), weight=weight.to(**cast), bias=bias.to(**cast), labels=labels,
                teacher_logits=teacher_logits.to(**cast), teacher_ids=ids, teacher_logprobs=lps.to(**cast))


def targets_for(mode, p):
    if mode == "dense":
        return dict(teacher_logits=p["teacher_logits"])
    return dict(teacher_ids=p["teacher_ids"], teacher_logprobs=p["teacher_logprobs"])


def cfg_for(kind, mode, **kw):
    return LossConfig(loss=kind, tail="tail" if mode == "dense" else mode, **kw)


def exact_divergence(kind, teacher_lp, student_lp, beta=0.5):
    """(N,) full-vocab divergence from normalized log-probs, via F.kl_div (independent of the library)."""
    def kl(p_lp, q_lp):  # KL(p || q)
        return F.kl_div(q_lp, p_lp, reduction="none", log_target=True).sum(-1)
    if kind == "forward_kl":
        return kl(teacher_lp, student_lp)
    if kind == "reverse_kl":
        return kl(student_lp, teacher_lp)
    m = (beta * teacher_lp.exp() + (1 - beta) * student_lp.exp()).log()
    return beta * kl(teacher_lp, m) + (1 - beta) * kl(student_lp, m)


def masked_mean(per_pos, labels):
    valid = labels != -100
    return per_pos[valid].sum() / valid.sum()


def logits_of(p):
    return p["hidden"] @ p["weight"].T + p["bias"]


# --- config ------------------------------------------------------------------------------------------------------------

def test_validate_collects_every_problem():
    with pytest.raises(ValueError, match=r"loss='kl'.*forward_kl, reverse_kl, jsd.*tail='x'.*alpha=1.5.*temperature=0"):
        LossConfig(loss="kl", tail="x", alpha=1.5, temperature=0.0).validate()
    with pytest.raises(ValueError, match="beta=1.0"):
        plain_distill_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), LossConfig(beta=1.0))
    LossConfig().validate()


def test_bad_target_arguments_are_named():
    p = make_problem()
    z = logits_of(p).float()
    with pytest.raises(ValueError, match="not both"):
        plain_distill_loss(z, p["labels"], LossConfig(), **targets_for("tail", p), teacher_logits=p["teacher_logits"])
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_distill_loss(p["hidden"], p["weight"], p["labels"], LossConfig(), teacher_logits=p["teacher_logits"][:3])


# --- exactness against independent full-vocab formulas -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_equal_vocab_is_exact_full_vocab_divergence(kind, tail, temperature):
    p = make_problem(dtype=torch.float32)
    z, tl, labels = logits_of(p), p["teacher_logits"], p["labels"]
    v = z.shape[-1]
    ids = torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(i)) for i in range(z.shape[0])])
    lps = torch.log_softmax(tl, -1).gather(1, ids)  # every id stored, shuffled: no tail
    cfg = LossConfig(loss=kind, tail=tail, alpha=0.0, temperature=temperature)
    expected = temperature ** 2 * masked_mean(
        exact_divergence(kind, torch.log_softmax(tl / temperature, -1), torch.log_softmax(z / temperature, -1)), labels)
    plain = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=lps)
    fused = fused_distill_loss(p["hidden"], p["weight"], labels, cfg, bias=p["bias"], teacher_ids=ids,
                               teacher_logprobs=lps)
    torch.testing.assert_close(plain.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dense_targets_are_exact_and_tempered(kind, temperature):
    p = make_problem(dtype=torch.float64)
    z, tl, labels = logits_of(p), p["teacher_logits"], p["labels"]
    cfg = LossConfig(loss=kind, alpha=0.0, temperature=temperature)
    out = plain_distill_loss(z, labels, cfg, teacher_logits=tl)
    kl = exact_divergence(kind, torch.log_softmax(tl / temperature, -1), torch.log_softmax(z / temperature, -1))
    torch.testing.assert_close(out.kd, temperature ** 2 * masked_mean(kl, labels))
    torch.testing.assert_close(out.ce, F.cross_entropy(z, labels))  # CE stays at T = 1


def bucket_divergence(kind, p, q, beta=0.5):
    """Divergence between two explicit bucket distributions (last dim), zero-mass buckets skipped on the left side."""
    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.log()), 0.0).sum(-1)
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_top_k_matches_explicit_bucket_construction(kind, tail):
    """Each tail mode, tempered, against distributions built by hand (float64, top-k rows with a real tail)."""
    t = 1.5
    p = make_problem(dtype=torch.float64)
    z, tl, labels = logits_of(p), p["teacher_logits"], p["labels"]
    n, v = z.shape
    top = torch.log_softmax(tl, -1).topk(4, -1)
    ids, head_p = top.indices, top.values.exp()  # (n, 4)
    rest = 1 - head_p.sum(-1, keepdim=True)  # (n, 1) teacher tail at T = 1
    q = torch.softmax(z / t, -1)  # student at T
    q_head = q.gather(1, ids)
    if tail == "tail":  # ghost bucket tempered as a single token
        teacher = torch.cat([head_p, rest], -1) ** (1 / t)
        teacher = teacher / teacher.sum(-1, keepdim=True)
        per_pos = bucket_divergence(kind, teacher, torch.cat([q_head, 1 - q_head.sum(-1, keepdim=True)], -1))
    elif tail == "renormalize":
        teacher = head_p ** (1 / t)
        teacher = teacher / teacher.sum(-1, keepdim=True)
        if kind == "reverse_kl":  # student restricted to the stored ids
            per_pos = bucket_divergence(kind, teacher, q_head / q_head.sum(-1, keepdim=True))
        else:  # teacher tail 0, student keeps its tail bucket
            teacher = torch.cat([teacher, torch.zeros(n, 1, dtype=teacher.dtype)], -1)
            per_pos = bucket_divergence(kind, teacher, torch.cat([q_head, 1 - q_head.sum(-1, keepdim=True)], -1))
    else:  # uniform: every non-stored id gets rest / (V - K), then the full distribution is tempered
        full = (rest / (v - 4)).expand(n, v).clone().scatter(1, ids, head_p) ** (1 / t)
        per_pos = bucket_divergence(kind, full / full.sum(-1, keepdim=True), q)
    cfg = LossConfig(loss=kind, tail=tail, alpha=0.0, temperature=t)
    out = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=top.values)
    torch.testing.assert_close(out.kd, t ** 2 * masked_mean(per_pos, labels))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_padded_slots_count_for_nothing(kind, tail):
    """Sampled rows padded with -inf (repeating a valid id) give the same loss as each row computed unpadded."""
    p = make_problem(dtype=torch.float64, masked=())
    z = logits_of(p).requires_grad_()
    cfg = LossConfig(loss=kind, tail=tail, alpha=0.0, temperature=1.3)
    out = plain_distill_loss(z, p["labels"], cfg, teacher_ids=p["teacher_ids"], teacher_logprobs=p["teacher_logprobs"])
    (grad,) = torch.autograd.grad(out.loss, z)
    assert torch.isfinite(grad).all()
    rows = []
    for i in range(z.shape[0]):
        keep = p["teacher_logprobs"][i] > -math.inf
        rows.append(plain_distill_loss(z[i:i + 1], p["labels"][i:i + 1], cfg,
                                       teacher_ids=p["teacher_ids"][i:i + 1, keep],
                                       teacher_logprobs=p["teacher_logprobs"][i:i + 1, keep]).kd)
    torch.testing.assert_close(out.kd, torch.stack(rows).mean())


def test_position_without_stored_ids_adds_no_kd_and_no_nan():
    p = make_problem(dtype=torch.float32, masked=())
    lps = p["teacher_logprobs"].clone()
    lps[0] = -math.inf
    z = logits_of(p).requires_grad_()
    for kind in KINDS:
        out = plain_distill_loss(z, p["labels"], LossConfig(loss=kind, alpha=0.0), teacher_ids=p["teacher_ids"],
                                 teacher_logprobs=lps)
        (grad,) = torch.autograd.grad(out.loss, z)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and grad[0].abs().max() == 0


# --- k = V exactness and exactly tempered stored targets ---------------------------------------------------------------

KIND_BETAS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def all_ids_shuffled(n, v):
    return torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(i)) for i in range(n)])  # (n, V)


def dense_reference(p, kind, beta, alpha, temperature):
    """alpha * CE + (1 - alpha) * T^2 * KD from full-vocab formulas (F.kl_div) on materialized logits; with grads."""
    h, w, b = (p[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    z = h @ w.T + b
    kd = masked_mean(exact_divergence(kind, torch.log_softmax(p["teacher_logits"] / temperature, -1),
                                      torch.log_softmax(z / temperature, -1), beta), p["labels"])
    loss = alpha * F.cross_entropy(z, p["labels"]) + (1 - alpha) * temperature ** 2 * kd
    return loss, torch.autograd.grad(loss, (h, w, b))


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature,log_norm", [(1.0, False), (2.0, False), (2.0, True), (4.0, True)])
def test_top_k_equal_vocab_is_exact_to_float64_rounding(kind, beta, tail, temperature, log_norm):
    """Every id stored (float64): plain and fused equal the dense tempered KD, values and gradients, to rounding.
    Catches the student's ghost floor (it added (1-beta) 1e-6 ln(1/(1-beta)) T^2 per token to JSD) and a tail bucket
    made of rounding; with the stored log-normalizer (T = 2, 4) the exact tempering path is checked too."""
    p = make_problem(dtype=torch.float64)
    n, v = p["teacher_logits"].shape
    ids = all_ids_shuffled(n, v)
    targets = dict(teacher_ids=ids, teacher_logprobs=torch.log_softmax(p["teacher_logits"], -1).gather(1, ids))
    if log_norm:
        targets["teacher_log_norm"] = tempered_log_norm(p["teacher_logits"], temperature)
    cfg = LossConfig(loss=kind, tail=tail, alpha=0.3, beta=beta, temperature=temperature, chunk_size=3)
    expected, expected_grads = dense_reference(p, kind, beta, 0.3, temperature)
    for out, grads in run_both(p, cfg, targets):
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-13)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tempered_teacher_logprobs_are_exact():
    """Stored T = 1 log-probs + the stored log-normalizer give softmax(z / T) at the stored ids and the exact tail."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3.0 + 7.0  # shifted: logZ is far from 0
    for t in (0.5, 2.0, 4.0):
        log_norm = tempered_log_norm(z, t)  # (6,)
        torch.testing.assert_close(log_norm, log_norm_from_partitions(z.logsumexp(-1), (z / t).logsumexp(-1), t))
        assert (log_norm >= 0).all() if t > 1 else (log_norm <= 0).all()
        top = torch.log_softmax(z, -1).topk(9, -1)
        head, tail_lm = tempered_teacher_logprobs(top.values, log_norm, t)  # (6, 9), (6,)
        truth = torch.log_softmax(z / t, -1)
        torch.testing.assert_close(head, truth.gather(1, top.indices), rtol=0, atol=1e-12)
        rest = truth.scatter(1, top.indices, -math.inf).logsumexp(-1)  # tempered mass of the ids not stored
        torch.testing.assert_close(tail_lm.exp(), rest.exp(), rtol=0, atol=1e-15)  # 1 - sum: absolute rounding
    head, tail_lm = tempered_teacher_logprobs(torch.log_softmax(z, -1), tempered_log_norm(z, 2.0), 2.0)  # all ids
    assert (tail_lm < math.log(1e-12)).all()  # rounding only (or -inf): no tail when every id is stored
    assert tempered_log_norm(z, 1.0).abs().max() < 1e-12


def peaked_problem(temperature, v=60, k=8, n=12, seed=5):
    """A real-looking case: a peaked teacher whose top-k holds part of the mass, a student near it (float64)."""
    g = torch.Generator().manual_seed(seed)
    tl = torch.randn(n, v, generator=g, dtype=torch.float64) * 1.5
    tl[:, :3] += 3.0
    z = (tl + torch.randn(n, v, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    top = torch.log_softmax(tl, -1).topk(k, -1)
    return tl, z, top.indices, top.values, tempered_log_norm(tl, temperature)


def within_tail_divergence(kind, p, q, stored, beta):
    """(n,) what merging the ids not stored into one bucket removes from a divergence (chain rule of KL): the masses
    outside the stored ids times the divergence between the conditionals there. p, q (n, V) probabilities."""
    out = ~stored
    r, big_q = (p * out).sum(-1, keepdim=True), (q * out).sum(-1, keepdim=True)

    def kl_out(a, a_mass, b, b_mass):  # a_mass * KL(a|out || b|out)
        return a_mass.squeeze(-1) * torch.where(out, (a / a_mass) * ((a / a_mass).log() - (b / b_mass).log()), 0.0).sum(-1)

    if kind == "forward_kl":
        return kl_out(p, r, q, big_q)
    if kind == "reverse_kl":
        return kl_out(q, big_q, p, r)
    m, m_mass = beta * p + (1 - beta) * q, beta * r + (1 - beta) * big_q
    return beta * kl_out(p, r, m, m_mass) + (1 - beta) * kl_out(q, big_q, m, m_mass)


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_exact_tempered_tail_is_within_the_truncation_error(kind, beta, temperature):
    """Top-k < V with the stored log-normalizer, `tail` mode: the dense tempered KD minus ours is exactly what merging the
    non-stored ids into one bucket removes (>= 0 by the data processing inequality; for JSD at most the merged
    bucket's mixture mass times ln 2). Without the normalizer the tail approximation misses by far more."""
    tl, z, ids, lps, log_norm = peaked_problem(temperature)
    labels = torch.zeros(tl.shape[0], dtype=torch.long)
    p, q = torch.softmax(tl / temperature, -1), torch.softmax(z / temperature, -1)  # (n, V)
    stored = torch.zeros_like(p, dtype=torch.bool).scatter(1, ids, True)
    dense = exact_divergence(kind, p.log(), q.log(), beta)  # (n,)
    gap = within_tail_divergence(kind, p, q, stored, beta)  # (n,)
    cfg = LossConfig(loss=kind, tail="tail", alpha=0.0, beta=beta, temperature=temperature)
    ours = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=lps, teacher_log_norm=log_norm)
    t2 = temperature ** 2
    torch.testing.assert_close(ours.kd, t2 * (dense - gap).mean(), rtol=1e-10, atol=1e-12)
    assert (gap >= 0).all() and ours.kd <= t2 * dense.mean()
    if kind == "jsd":
        r, big_q = (p * ~stored).sum(-1), (q * ~stored).sum(-1)
        assert (gap <= (beta * r + (1 - beta) * big_q) * math.log(2)).all()
    approx = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=lps).kd
    assert (approx - t2 * dense.mean()).abs() > 3 * (ours.kd - t2 * dense.mean()).abs()


@pytest.mark.parametrize("kind", KINDS)
def test_exact_tempered_modes_match_explicit_bucket_construction(kind):
    """With the stored log-normalizer: tail = ghost bucket of the exact tempered tail mass; uniform = that mass spread
    evenly over the ids not stored; renormalize = the tempered teacher conditioned on the stored ids (as without it)."""
    t = 2.0
    tl, z, ids, lps, log_norm = peaked_problem(t, n=6)
    labels = torch.zeros(tl.shape[0], dtype=torch.long)
    n, v = tl.shape
    p_t = torch.softmax(tl / t, -1)
    head = p_t.gather(1, ids)  # (n, K) exact tempered teacher at the stored ids
    rest = 1 - head.sum(-1, keepdim=True)
    q = torch.softmax(z / t, -1)
    q_head = q.gather(1, ids)
    q_buckets = torch.cat([q_head, 1 - q_head.sum(-1, keepdim=True)], -1)
    expected = {
        "tail": bucket_divergence(kind, torch.cat([head, rest], -1), q_buckets),
        "uniform": bucket_divergence(kind, (rest / (v - ids.shape[1])).expand(n, v).clone().scatter(1, ids, head), q),
    }
    for tail in TAILS:
        cfg = LossConfig(loss=kind, tail=tail, alpha=0.0, temperature=t)
        out = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=lps, teacher_log_norm=log_norm)
        if tail == "renormalize":
            without = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=lps)
            torch.testing.assert_close(out.kd, without.kd)
        else:
            torch.testing.assert_close(out.kd, t ** 2 * expected[tail].mean())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_fused_equals_plain_with_log_norm(kind, tail, chunk_size):
    p = make_problem(dtype=torch.float32)
    top = torch.log_softmax(p["teacher_logits"], -1).topk(5, -1)
    targets = dict(teacher_ids=top.indices, teacher_logprobs=top.values,
                   teacher_log_norm=tempered_log_norm(p["teacher_logits"], 2.0))
    cfg = LossConfig(loss=kind, tail=tail, alpha=0.3, temperature=2.0, chunk_size=chunk_size)
    (plain, plain_grads), (fused, fused_grads) = run_both(p, cfg, targets)
    for a, b in [(fused.loss, plain.loss), (fused.kd, plain.kd)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if tail != "renormalize":  # the argument is used (renormalize never reads the tail)
        without = plain_distill_loss(logits_of(p), p["labels"], cfg, teacher_ids=top.indices, teacher_logprobs=top.values)
        assert (plain.kd - without.kd).abs() > 1e-3


@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_fused_with_log_norm(tail):
    p = make_problem(n=6, d=3, v=9, k=3, dtype=torch.float64, masked=(1,))
    top = torch.log_softmax(p["teacher_logits"], -1).topk(3, -1)
    targets = dict(teacher_ids=top.indices, teacher_logprobs=top.values,
                   teacher_log_norm=tempered_log_norm(p["teacher_logits"], 1.7))
    cfg = LossConfig(loss="jsd", tail=tail, alpha=0.3, temperature=1.7, chunk_size=2)

    def loss(h, w, b):
        return fused_distill_loss(h, w, p["labels"], cfg, bias=b, **targets).loss

    inputs = tuple(p[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_targets_at_the_loss_temperature_are_used_as_they_are(kind):
    """Draws at tau = T estimate softmax(z / T) unbiased by count/N; passed with teacher_temperature = T they are not
    tempered again: the KD is the divergence to exactly that estimate (and at T = 1 nothing changes)."""
    t = 2.0
    tl, z, _, _, _ = peaked_problem(t, n=4)
    g = torch.Generator().manual_seed(11)
    draws = torch.multinomial(torch.softmax(tl / t, -1), 32, replacement=True, generator=g)  # (n, 32)
    counts = torch.zeros_like(tl).scatter_add_(1, draws, torch.ones_like(draws, dtype=tl.dtype))  # (n, V)
    k = int((counts > 0).sum(-1).max())
    ids = counts.topk(k, -1).indices  # (n, k) drawn ids first, padded with undrawn ones
    lps = (counts.gather(1, ids) / 32).log()  # -inf at undrawn = padded slots
    estimate = counts / 32  # (n, V)
    q = torch.softmax(z / t, -1)
    labels = torch.zeros(tl.shape[0], dtype=torch.long)
    cfg = LossConfig(loss=kind, tail="tail", alpha=0.0, temperature=t)
    out = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=lps, teacher_temperature=t)
    if kind == "reverse_kl":  # restricted to the drawn ids, as every sampled target is
        q = torch.where(estimate > 0, q, 0.0)
        q = q / q.sum(-1, keepdim=True)
    torch.testing.assert_close(out.kd, t ** 2 * bucket_divergence(kind, estimate, q).mean())
    tempered_again = plain_distill_loss(z, labels, cfg, teacher_ids=ids, teacher_logprobs=lps).kd
    assert (tempered_again - out.kd).abs() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_fused_equals_plain_with_teacher_temperature(kind, tail):
    p = make_problem(dtype=torch.float32)  # mixed top-k and sampled rows, taken as normalized at T0 = 2, used at T = 3
    cfg = LossConfig(loss=kind, tail=tail, alpha=0.3, temperature=3.0, chunk_size=3)
    (plain, plain_grads), (fused, fused_grads) = run_both(p, cfg, dict(targets_for(tail, p), teacher_temperature=2.0))
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_garbage_log_norm_at_masked_positions_does_not_leak():
    p = make_problem(dtype=torch.float32)  # rows 2 and 7 masked
    top = torch.log_softmax(p["teacher_logits"], -1).topk(5, -1)
    log_norm = tempered_log_norm(p["teacher_logits"], 2.0)
    garbage = log_norm.clone()
    garbage[[2, 7]] = torch.tensor([math.nan, math.inf])
    cfg = LossConfig(loss="jsd", tail="tail", alpha=0.3, temperature=2.0, chunk_size=3)
    results = [run_both(p, cfg, dict(teacher_ids=top.indices, teacher_logprobs=top.values, teacher_log_norm=ln))
               for ln in (log_norm, garbage)]
    for (clean, clean_grads), (dirty, dirty_grads) in zip(*results):
        torch.testing.assert_close(dirty.loss, clean.loss)
        for a, b in zip(dirty_grads, clean_grads):
            torch.testing.assert_close(a, b)


def test_tempering_arguments_are_checked():
    p = make_problem()
    z, labels = logits_of(p).float(), p["labels"]
    log_norm = tempered_log_norm(p["teacher_logits"], 2.0)
    cfg = LossConfig(temperature=2.0)
    with pytest.raises(ValueError, match="dense teacher_logits are tempered exactly"):
        plain_distill_loss(z, labels, cfg, teacher_logits=p["teacher_logits"], teacher_log_norm=log_norm)
    with pytest.raises(ValueError, match="teacher_temperature=2.0; pass one or the other"):
        plain_distill_loss(z, labels, cfg, **targets_for("tail", p), teacher_log_norm=log_norm, teacher_temperature=2.0)
    with pytest.raises(ValueError, match=r"teacher_log_norm \(3,\) must hold one value per position \(N=10\)"):
        fused_distill_loss(p["hidden"], p["weight"], labels, cfg, **targets_for("tail", p), teacher_log_norm=log_norm[:3])
    with pytest.raises(ValueError, match="teacher_temperature=0"):
        plain_distill_loss(z, labels, cfg, **targets_for("tail", p), teacher_temperature=0)


# --- fused == plain ----------------------------------------------------------------------------------------------------

def run_both(p, cfg, targets, plain_logits_dtype=None):
    """Loss and grads (hidden, weight, bias) from the plain path on materialized logits and from the fused path."""
    results = []
    for path in ("plain", "fused"):
        h, w, b = (p[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        if path == "plain":
            cast = plain_logits_dtype or h.dtype
            out = plain_distill_loss(h.to(cast) @ w.to(cast).T + b.to(cast), p["labels"], cfg, **targets)
        else:
            out = fused_distill_loss(h, w, p["labels"], cfg, bias=b, **targets)
        results.append((out, torch.autograd.grad(out.loss, (h, w, b))))
    return results


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_fused_equals_plain_float32(kind, mode, chunk_size):
    p = make_problem(dtype=torch.float32)
    cfg = cfg_for(kind, mode, alpha=0.3, temperature=1.0 if chunk_size == 3 else 2.0, chunk_size=chunk_size)
    (plain, plain_grads), (fused, fused_grads) = run_both(p, cfg, targets_for(mode, p))
    assert fused.n_tokens == plain.n_tokens == 8
    for a, b in [(fused.loss, plain.loss), (fused.ce, plain.ce), (fused.kd, plain.kd)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_equals_plain_bfloat16(kind, mode):
    """bf16 hidden/weight: fused upcasts per chunk, so it equals plain on float32 logits of the same bf16 tensors;
    gradients come back in bf16 (hence the looser tolerance)."""
    p = make_problem(dtype=torch.bfloat16)
    cfg = cfg_for(kind, mode, alpha=0.4, temperature=1.5, chunk_size=4)
    (plain, plain_grads), (fused, fused_grads) = run_both(p, cfg, targets_for(mode, p), plain_logits_dtype=torch.float32)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2 * b.float().abs().max().item())


def test_storage_dtypes_are_accepted():
    """Stage one may store ids and labels as int32 and log-probs as float16."""
    p = make_problem(dtype=torch.float32)
    cfg = LossConfig(chunk_size=4)
    expected = run_both(p, cfg, targets_for("tail", p))[0][0].loss
    small = dict(teacher_ids=p["teacher_ids"].int(), teacher_logprobs=p["teacher_logprobs"].half())
    for out, _ in run_both(dict(p, labels=p["labels"].int()), cfg, small):
        torch.testing.assert_close(out.loss, expected, rtol=1e-3, atol=1e-3)  # fp16 rounding of the log-probs


def test_fused_without_targets_and_alpha_one_is_cross_entropy():
    p = make_problem(dtype=torch.float64)
    expected = F.cross_entropy(logits_of(p), p["labels"], ignore_index=-100)
    for cfg, targets in [(LossConfig(alpha=0.3), {}), (LossConfig(alpha=1.0), targets_for("tail", p))]:
        (plain, plain_grads), (fused, fused_grads) = run_both(p, cfg, targets)
        for out in (plain, fused):
            torch.testing.assert_close(out.loss, expected)
            assert out.kd == 0
        for a, b in zip(fused_grads, plain_grads):
            torch.testing.assert_close(a, b)


def test_alpha_mixes_ce_and_kd():
    p = make_problem(dtype=torch.float64)
    z = logits_of(p)
    for path in ("plain", "fused"):
        for alpha in (0.0, 0.25, 1.0):
            cfg = LossConfig(alpha=alpha, temperature=2.0)
            if path == "plain":
                out = plain_distill_loss(z, p["labels"], cfg, **targets_for("tail", p))
            else:
                out = fused_distill_loss(p["hidden"], p["weight"], p["labels"], cfg, bias=p["bias"],
                                         **targets_for("tail", p))
            torch.testing.assert_close(out.ce, F.cross_entropy(z, p["labels"]))
            kd = out.kd if alpha < 1 else 0.0
            torch.testing.assert_close(out.loss, alpha * out.ce + (1 - alpha) * kd)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_is_zero_with_zero_grads(mode):
    p = make_problem(dtype=torch.float32, masked=range(10))
    p["teacher_logprobs"][:3] = -math.inf  # garbage teacher rows at masked positions must not leak NaN
    for kind in KINDS:
        for (out, grads) in run_both(p, cfg_for(kind, mode, alpha=0.5, temperature=2.0), targets_for(mode, p)):
            assert out.n_tokens == 0 and out.loss.item() == 0.0 and out.kd.item() == 0.0
            assert all(g.abs().max() == 0 for g in grads)


# --- the custom autograd path ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_fused_float64(kind, mode):
    p = make_problem(n=6, d=3, v=9, k=3, dtype=torch.float64, masked=(1,))
    cfg = cfg_for(kind, mode, alpha=0.3, temperature=1.7, chunk_size=2)
    targets = targets_for(mode, p)

    def loss(h, w, b):
        return fused_distill_loss(h, w, p["labels"], cfg, bias=b, **targets).loss

    inputs = tuple(p[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        sizes = [t.numel() for t in tree_leaves(out)  # views of inputs allocate nothing
                 if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.largest = max([self.largest] + sizes)
        return out


@pytest.mark.parametrize("mode", MODES)
def test_fused_never_builds_full_logits(mode):
    p = make_problem(n=64, d=4, v=40, k=5, masked=())
    h, w = p["hidden"].requires_grad_(), p["weight"].requires_grad_()
    with _LargestTensor() as probe:
        out = fused_distill_loss(h, w, p["labels"], cfg_for("jsd", mode, temperature=2.0, chunk_size=8),
                                 **targets_for(mode, p))
        out.loss.backward()
    assert probe.largest <= 8 * 40 < 64 * 40  # one chunk of logits at most, never (N, V)


def test_fused_without_grad_and_retained_graph():
    p = make_problem()
    cfg = LossConfig(chunk_size=4)
    with torch.no_grad():
        value = fused_distill_loss(p["hidden"], p["weight"], p["labels"], cfg, **targets_for("tail", p)).loss
    w = p["weight"].clone().requires_grad_()
    out = fused_distill_loss(p["hidden"], w, p["labels"], cfg, **targets_for("tail", p))
    torch.testing.assert_close(out.loss.detach(), value)
    out.loss.backward(retain_graph=True)
    first = w.grad.clone()
    (3 * out.loss).backward()  # a second backward through the same graph, with a non-unit upstream gradient
    torch.testing.assert_close(w.grad, 4 * first)


def test_fused_math_stays_float32_under_autocast():
    p = make_problem(dtype=torch.float32)
    cfg = LossConfig(chunk_size=4, temperature=2.0)
    expected = fused_distill_loss(p["hidden"], p["weight"], p["labels"], cfg, **targets_for("tail", p)).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_distill_loss(p["hidden"], p["weight"], p["labels"], cfg, **targets_for("tail", p)).loss
    torch.testing.assert_close(got, expected)


# --- hidden states -----------------------------------------------------------------------------------------------------

def test_layer_maps():
    assert default_layer_map(2, 4) == {1: 2, 2: 4}
    assert default_layer_map(4, 6) == {1: 2, 2: 3, 3: 5, 4: 6}  # 1.5 and 4.5 round up
    assert default_layer_map(3, 3) == {1: 1, 2: 2, 3: 3}
    assert parse_layer_map(" 1:2, 2 : 4 ") == {1: 2, 2: 4}
    with pytest.raises(ValueError, match=r"'a:1' is not student:teacher.*'3' is not.*e\.g\. '1:2,2:4'"):
        parse_layer_map("a:1,3")
    with pytest.raises(ValueError, match="mapped twice"):
        parse_layer_map("1:2,1:3")
    with pytest.raises(ValueError, match="empty"):
        parse_layer_map(" ")
    proj = make_projections({1: 2, 3: 6}, 4, 7)
    assert list(proj) == ["1", "3"] and proj["3"].weight.shape == (7, 4)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_hand_computation(kind):
    torch.manual_seed(0)
    n, d_s, d_t = 6, 4, 7
    layer_map = {1: 2, 2: 4}
    proj = make_projections(layer_map, d_s, d_t)
    student = {1: torch.randn(n, d_s, requires_grad=True), 2: torch.randn(n, d_s, dtype=torch.bfloat16)}
    teacher = {2: torch.randn(n, d_t), 4: torch.randn(n, d_t)}
    teacher[4][5] = math.nan  # masked position: must not leak
    mask = torch.tensor([True, True, False, True, True, False])
    loss = hidden_state_loss(student, teacher, proj, mask, kind, layer_map=layer_map)
    expected = 0.0
    for s_layer, t_layer in layer_map.items():
        per_pair = []
        for i in mask.nonzero().flatten().tolist():
            x = proj[str(s_layer)].weight @ student[s_layer][i].float() + proj[str(s_layer)].bias
            y = teacher[t_layer][i]
            per_pair.append(((x - y) ** 2).sum() / d_t if kind == "mse" else 1 - x.dot(y) / (x.norm() * y.norm()))
        expected = expected + sum(per_pair) / len(per_pair) / 2
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert proj["1"].weight.grad.abs().sum() > 0 and student[1].grad.abs().sum() > 0
    zero = hidden_state_loss(student, teacher, proj, torch.zeros(n, dtype=torch.bool), kind, layer_map=layer_map)
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="teacher hidden states lack layer 1"):
        hidden_state_loss(student, teacher, proj, mask, kind)  # keyed by teacher layer, but no layer_map given
