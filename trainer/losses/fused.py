"""Fused chunked loss: student logits built from final hidden states and the output embedding a chunk of tokens at a time.

The default loss of `trainer.train` when the model exposes its output embedding. Materializing (N, V) float32 logits plus
their log-softmax and gradient costs several GB at V = 128k (N = 4096: 2 GB per tensor), so instead a custom autograd
Function loops over chunks of valid positions and, in the forward pass, computes each chunk's loss AND its gradients
w.r.t. the chunk's hidden states and the embedding. Nothing is kept for backward but those gradients, which backward
scales by the incoming grad. Why gradients during forward rather than recomputing in backward: each chunk's logits are
then built once instead of twice, so a step costs the same matmuls as the plain path (3 per token), and the only
long-lived buffers are grad_hidden (N, D) and a float32 grad_weight (V, D).

Per chunk, in place on one (n, V) buffer: logits -> student log-probs s -> gradient. CE and KD share that log-softmax.
The gradient w.r.t. the logits is assembled analytically: for a loss L(s) with g = dL/ds,
dL/du = g - softmax(u) * sum(g), u = z / T. g is sparse for the stored-id buckets (its values come from a tiny autograd
graph over the gathered (n, K) log-probs, see `buckets.sparse_kd`) and dense only for dense targets and the uniform tail.
"""

import torch

from .buckets import (check_targets, compute_dtype, dense_teacher_logprobs, divergence_grad, divergence_terms,
                      sparse_kd, sparse_teacher_buckets, uniform_sweep)
from .config import LossConfig, LossOutput


def fused_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, *,
                       bias: torch.Tensor | None = None, teacher_ids: torch.Tensor | None = None,
                       teacher_logprobs: torch.Tensor | None = None,
                       teacher_logits: torch.Tensor | None = None, teacher_log_norm: torch.Tensor | None = None,
                       teacher_temperature: float = 1.0) -> LossOutput:
    """Same value as `plain_distill_loss(hidden @ weight.T + bias, ...)`, without building (N, V) at once.

    hidden (N, D) (or (B, T, D)): final hidden states after the final norm; weight (V, D): output embedding; bias (V,).
    bfloat16/float16 inputs are upcast per chunk to float32; their gradients come back in the input dtype (the weight's
    gradient is accumulated in float32). Targets and labels as in `plain_distill_loss`.
    The gradient work happens in this call whenever grad mode is on and an input requires grad, so evaluate under
    torch.no_grad().
    """
    cfg.validate()
    d = hidden.shape[-1]
    vocab = weight.shape[0]
    hidden2 = hidden.reshape(-1, d)  # (N, D)
    labels = labels.reshape(-1).long()  # (N,); stored ids and labels may come as int32
    n = labels.shape[0]
    if hidden2.shape[0] != n or weight.shape[1] != d or (bias is not None and bias.shape != (vocab,)):
        raise ValueError(f"shapes do not fit: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} (V, D), "
                         f"bias {None if bias is None else tuple(bias.shape)} (V,), labels {tuple(labels.shape)}")
    targets = check_targets(n, vocab, teacher_ids, teacher_logprobs, teacher_logits, teacher_log_norm,
                            teacher_temperature)
    kd_on = targets is not None and cfg.alpha < 1.0
    if not kd_on:
        teacher_ids = teacher_logprobs = teacher_logits = teacher_log_norm = None
    elif targets == "sparse":
        teacher_ids, teacher_logprobs = teacher_ids.reshape(n, -1).long(), teacher_logprobs.reshape(n, -1)
        teacher_log_norm = None if teacher_log_norm is None else teacher_log_norm.reshape(n)
    else:
        teacher_logits = teacher_logits.reshape(n, vocab)

    valid = labels != cfg.ignore_index
    positions = valid.nonzero().squeeze(1)  # (n_tokens,) only valid positions are computed at all
    n_tokens = int(positions.numel())
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden2, weight, bias))
    teacher = dict(teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, teacher_logits=teacher_logits,
                   teacher_log_norm=teacher_log_norm)
    loss, ce, kd = _FusedDistill.apply(hidden2, weight, bias, labels, positions, n_tokens, needs, cfg, kd_on,
                                       teacher, teacher_temperature)
    return LossOutput(loss=loss, ce=ce, kd=kd, n_tokens=n_tokens)


class _FusedDistill(torch.autograd.Function):
    """Chunked loss whose forward also computes the input gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, positions, n_tokens, needs, cfg, kd_on, teacher,
                teacher_temperature):
        """teacher: dict of the target tensors (None where absent), all constants, indexed by position per chunk."""
        dtype = compute_dtype(hidden.dtype)
        need_h, need_w, need_b = needs
        need_any = need_h or need_w or need_b
        w = weight.to(dtype)  # (V, D); a float32 copy only for low-precision weights
        b = None if bias is None else bias.to(dtype)
        denom = max(n_tokens, 1)
        alpha = cfg.alpha if kd_on else 1.0
        w_ce = alpha / denom  # d loss / d ce_i for each valid position i
        w_kd = (1.0 - alpha) * cfg.temperature ** 2 / denom

        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, D)
        grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None  # (V, D) accumulator
        grad_b = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_b else None
        ce_sum = torch.zeros((), dtype=dtype, device=w.device)
        kd_sum = torch.zeros((), dtype=dtype, device=w.device)
        # Float32 math is the contract: an enclosing autocast region must not turn the chunk's matmuls into bf16.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n_tokens, cfg.chunk_size):
                idx = positions[start:start + cfg.chunk_size]  # (n,)
                h = hidden.index_select(0, idx).to(dtype)  # (n, D)
                z = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (n, V) float logits of this chunk only
                chunk_targets = {k: None if v is None else v.index_select(0, idx) for k, v in teacher.items()}
                ce_c, kd_c, grad_z = chunk_loss_and_grad(z, labels.index_select(0, idx), cfg, w_ce, w_kd, need_any,
                                                         teacher_temperature=teacher_temperature, **chunk_targets)
                del z  # grad_z is the same buffer
                ce_sum += ce_c.sum()
                kd_sum += kd_c.sum()
                if grad_z is not None:
                    if need_h:
                        grad_h.index_copy_(0, idx, (grad_z @ w).to(hidden.dtype))
                    if need_w:
                        grad_w.addmm_(grad_z.T, h)
                    if need_b:
                        grad_b += grad_z.sum(0)
                del grad_z

        ce = ce_sum / denom
        kd = kd_sum * cfg.temperature ** 2 / denom
        loss = alpha * ce + (1.0 - alpha) * kd
        # Saved as "saved tensors" so the engine frees them right after a backward without retain_graph; AccumulateGrad
        # can then adopt our buffers as .grad instead of copying them (V x D floats for the weight).
        ctx.save_for_backward(grad_h,
                              None if grad_w is None else grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grads = ctx.saved_tensors
        unit = bool((grad_loss == 1).all())
        scaled = [g if g is None or unit else g * grad_loss.to(g.dtype) for g in grads]
        return (*scaled, None, None, None, None, None, None, None, None)


def chunk_loss_and_grad(z, labels, cfg, w_ce, w_kd, need_grad, *, teacher_ids=None, teacher_logprobs=None,
                        teacher_logits=None, teacher_log_norm=None, teacher_temperature=1.0):
    """Loss terms of one chunk and the gradient of w_ce * sum(ce) + w_kd * sum(kd) w.r.t. its logits.

    z (n, V) float logits, OVERWRITTEN (it becomes the gradient); labels (n,) all valid. Targets (n, K) or (n, V) or None
    (then KD is off); teacher_log_norm (n,) or None and teacher_temperature as in `plain_distill_loss`. Returns ce (n,),
    kd (n,) (unscaled by T^2), grad_z (n, V) or None when need_grad is False.
    """
    n, vocab = z.shape
    kd_on = teacher_ids is not None or teacher_logits is not None
    temp = cfg.temperature if kd_on else 1.0  # T only softens KD; CE is always at T = 1
    z_label = z.gather(1, labels[:, None]).squeeze(1)  # (n,)
    # CE at T = 1 and KD at T share this pass; z becomes the student's log-probs at T, in place
    s, ce_label_lp = _log_softmax_inplace(z, labels, temp)
    ce = -ce_label_lp  # (n,)
    lse_z = z_label - ce_label_lp  # (n,) logsumexp(z)
    lse_u = z_label / temp - s.gather(1, labels[:, None]).squeeze(1)  # (n,) logsumexp(z / T)
    label_src = torch.full((n, 1), -w_ce, dtype=s.dtype, device=s.device)
    if not kd_on:  # CE only: s = log_softmax(z)
        if not need_grad:
            return ce, torch.zeros_like(ce), None
        grad = s.exp_().mul_(w_ce)  # (n, V) w_ce * softmax(z)
        return ce, torch.zeros_like(ce), grad.scatter_add_(1, labels[:, None], label_src)

    head_g = dense_g = None  # dL/ds: (n, K) at the stored ids, (n, V) for dense parts
    if teacher_logits is not None:
        teacher_lp = dense_teacher_logprobs(teacher_logits, temp, s.dtype)  # (n, V)
        kd = divergence_terms(cfg.loss, teacher_lp, s, cfg.beta).sum(1)
        if need_grad:
            dense_g = divergence_grad(cfg.loss, teacher_lp, s, cfg.beta).mul_(w_kd)
        del teacher_lp
    else:
        log_norm = None if teacher_log_norm is None else teacher_log_norm.to(s.dtype)  # (n,)
        teacher = sparse_teacher_buckets(teacher_logprobs.to(s.dtype), tail=cfg.tail, temperature=temp,
                                         vocab_size=vocab, log_norm=log_norm, teacher_temperature=teacher_temperature)
        head = s.gather(1, teacher_ids)  # (n, K)
        uniform = cfg.tail == "uniform"
        sweep = uniform_sweep(cfg.loss, cfg.beta, teacher.rest_lp, s) if uniform else None  # (n,)
        # Tiny autograd graph over (n, K) values: the bucket math is intricate, its vocab-sized part is not.
        with torch.enable_grad():
            head_leaf = head.requires_grad_(need_grad)
            sweep_leaf = sweep.requires_grad_(need_grad) if uniform else None
            kd_graph = sparse_kd(cfg.loss, cfg.beta, head_leaf, teacher, sweep_leaf)
            if need_grad:
                leaves = [head_leaf] + ([sweep_leaf] if uniform else [])
                grads = torch.autograd.grad(kd_graph.sum() * w_kd, leaves)
        kd = kd_graph.detach()
        if need_grad:
            head_g = grads[0]
            if uniform:  # d sweep / d s_j = divergence_grad at every id, weighted by dL/dsweep per position
                dense_g = divergence_grad(cfg.loss, teacher.rest_lp[:, None], s, cfg.beta).mul_(grads[1][:, None])
    if not need_grad:
        return ce, kd, None

    sum_g = torch.zeros_like(ce)  # (n,) sum_j dL/ds_j
    if head_g is not None:
        sum_g += head_g.sum(1)
    if dense_g is not None:
        sum_g += dense_g.sum(1)
    if temp == 1.0:  # dL/dz = softmax * (w_ce - sum g) + g - w_ce * onehot(label)
        grad = s.exp_().mul_((w_ce - sum_g)[:, None])
    else:  # dL/dz = (g - softmax(u) * sum g) / T + w_ce * (softmax(z) - onehot), softmax(z) = exp(T s + T lse_u - lse_z)
        ce_softmax = torch.mul(s, temp).add_((temp * lse_u - lse_z)[:, None]).exp_()  # (n, V)
        grad = s.exp_().mul_(-sum_g[:, None])
    if dense_g is not None:
        grad.add_(dense_g)
        del dense_g
    if head_g is not None:
        grad.scatter_add_(1, teacher_ids, head_g)
    if temp != 1.0:
        grad.div_(temp).add_(ce_softmax, alpha=w_ce)
    return ce, kd, grad.scatter_add_(1, labels[:, None], label_src)


def _log_softmax_inplace(z: torch.Tensor, labels: torch.Tensor, temp: float):
    """Overwrite z (n, V) with log_softmax(z / T) a few rows at a time (one fused kernel per block, so the chunk needs no
    second (n, V) buffer); also return log_softmax(z)[label] (n,) for CE at T = 1."""
    rows = max(1, 2**22 // z.shape[1])  # ~16 MB float32 temporaries: small next to the chunk, few Python iterations
    label_lp = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)  # (n,)
    for start in range(0, z.shape[0], rows):
        block = z[start:start + rows]  # (r, V) view
        lp = torch.log_softmax(block, 1)  # (r, V) temporary
        label_lp[start:start + rows] = lp.gather(1, labels[start:start + rows, None]).squeeze(1)
        if temp != 1.0:
            lp = torch.log_softmax(block.div_(temp), 1)
        block.copy_(lp)
    return z, label_lp
