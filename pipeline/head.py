"""The capture head in chunks: run the teacher's body once, then its output head and every target a chunk at a time.

At vocabularies of 128k-256k the capture's memory goes to the (batch, seq, vocab) logits and their float32 log-softmax,
not to the model. Here the body runs to its final hidden states (B, T, H); the head (lm_head, then Cohere's
`logit_scale` or Gemma 2/3's `final_logit_softcapping`) and `pipeline.targets` then run on `chunk` tokens at a time, so
at most (chunk, V) float32 values exist at once. Called by `pipeline.precompute`.

Only heads of a known structure are split (`HEAD_MODEL_TYPES`), and `ChunkedHead.verify` checks on the first batch that
the split head reproduces the model's own logits; any other teacher uses the whole-batch path, with a one-line notice.
"""

from __future__ import annotations

import torch

from .targets import FIDELITY_STRIDE, sampled_targets, topk_targets

DEFAULT_HEAD_CHUNK = 512  # tokens per chunk: (512, 256k) float32 = 512 MiB per intermediate; 0 = whole batch
# model types whose causal-LM forward is `lm_head(body(...).last_hidden_state)` then the optional scale / soft-cap below
HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "gemma", "gemma2", "gemma3_text",
    "cohere", "cohere2", "phi3", "olmo2", "starcoder2",
})


class ChunkedHead:
    """The body / head split of one causal LM. `split(model)` returns None when the head cannot be split safely."""

    def __init__(self, model, chunk: int):
        self.model, self.chunk = model, chunk
        self.body = getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        config = model.config
        self.scale = getattr(config, "logit_scale", None) if config.model_type in ("cohere", "cohere2") else None
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.verified = False

    def check(self, ids: torch.Tensor) -> bool:
        """`verify` once (first batch); on a difference print a one-line notice and return False (whole-batch head)."""
        problem = self.verify(ids)
        self.verified = True
        if problem:
            import sys

            print(f"--head-chunk: {problem}; using the whole-batch head", file=sys.stderr)
        return problem is None

    @staticmethod
    def split(model, chunk: int) -> tuple["ChunkedHead | None", str | None]:
        """(head, None), or (None, reason) when this teacher's head is not of a known structure."""
        model_type = getattr(model.config, "model_type", None)
        if model_type not in HEAD_MODEL_TYPES:
            return None, f"model type {model_type!r} has no known output head"
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if body is None or body is model or model.get_output_embeddings() is None:
            return None, f"{type(model).__name__} has no separate body and output head"
        return ChunkedHead(model, chunk), None

    def body_forward(self, ids: torch.Tensor, hidden: bool, position_ids: torch.Tensor | None = None):
        """ids (B, T) [, position_ids (B, T)] -> the body's output: last_hidden_state (B, T, H) and, when `hidden`,
        hidden_states."""
        return self.body(input_ids=ids, position_ids=position_ids, output_hidden_states=hidden, use_cache=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., H) -> the model's logits (..., V), in the model's dtype."""
        weight = self.head.weight
        out = self.head(h.to(weight.device) if weight.device.type != "meta" else h)
        if self.scale is not None:
            out = out * self.scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def verify(self, ids: torch.Tensor) -> str | None:
        """Compare the split head with the model's own forward on one window. None when equal, else what differs."""
        ref = self.model(input_ids=ids[:1], use_cache=False).logits[0].float()  # (T, V)
        mine = self.logits(self.body_forward(ids[:1], False).last_hidden_state)[0].float().to(ref.device)
        if mine.shape != ref.shape:
            return f"the split head gives logits of shape {tuple(mine.shape)}, the model {tuple(ref.shape)}"
        tol = (1e-4 if ref.dtype == torch.float32 and self.head.weight.dtype == torch.float32 else 2e-2) * max(1.0, float(ref.abs().max()))
        err = float((mine - ref).abs().max())
        return None if err <= tol else f"the split head differs from the model's logits by {err:.3g} (tolerance {tol:.3g})"


def chunk_slices(B: int, T: int, chunk: int, stride: int = FIDELITY_STRIDE):
    """(window rows, positions) slices covering a (B, T) batch, about `chunk` tokens each: whole windows when
    chunk >= T, otherwise pieces of one window whose starts are multiples of `stride` (so the every-`stride`-th-position
    fidelity sample falls on the same positions as in the whole batch)."""
    if chunk >= T:
        rows = chunk // T
        return [(slice(b, min(B, b + rows)), slice(0, T)) for b in range(0, B, rows)]
    piece = max(stride, chunk // stride * stride)
    return [(slice(b, b + 1), slice(t, min(T, t + piece))) for b in range(B) for t in range(0, T, piece)]


def chunked_targets(head: ChunkedHead, h: torch.Tensor, labels: torch.Tensor, k: int, logprob_bits: int | None,
                    sampled: tuple[int, float, torch.Generator] | None,
                    log_norm_temperatures: tuple[float, ...] = ()) -> tuple[dict, dict | None]:
    """Final hidden states h (B, T, H), labels (B, T) -> the same dicts as `topk_targets` and `sampled_targets` on the
    whole batch's logits, computed `head.chunk` tokens at a time."""
    B, T = labels.shape
    uniforms = None
    if sampled is not None:
        n, temperature, g = sampled
        uniforms = torch.rand(B * T, n, generator=g, device=g.device, dtype=torch.float64).reshape(B, T, n)
    top_rows, samp_rows = [], []
    for rows, pos in chunk_slices(B, T, head.chunk):
        logits = head.logits(h[rows, pos])  # (b, t, V)
        lab = labels[rows, pos].to(logits.device)
        top_rows.append((rows, topk_targets(logits, lab, k, logprob_bits=logprob_bits, rows_per_chunk=logits.shape[0],
                                            log_norm_temperatures=log_norm_temperatures)))
        if sampled is not None:
            u = uniforms[rows, pos].reshape(-1, sampled[0])
            samp_rows.append((rows, sampled_targets(logits, sampled[0], sampled[1], uniforms=u)))
        del logits
    return _assemble(top_rows, B), (_assemble(samp_rows, B) if sampled is not None else None)


def _assemble(parts: list[tuple[slice, dict]], B: int) -> dict:
    """Per-chunk results in row-major order -> whole-batch tensors: pieces of one window joined along T, then rows."""
    groups: list[tuple[int, list[dict]]] = []
    for rows, d in parts:
        if groups and groups[-1][0] == rows.start:
            groups[-1][1].append(d)
        else:
            groups.append((rows.start, [d]))
    out = {name: [torch.cat([d[name] for d in ds], dim=1) for _, ds in groups] for name in parts[0][1]}
    return {name: torch.cat(ts) for name, ts in out.items()}


def tp_groups(rank: int, world_size: int, tp: int) -> tuple[int, int, int]:
    """Tensor-parallel replicas under torchrun: ranks [g*tp, (g+1)*tp) form group g. Returns (group, groups, member):
    the group takes the shards rank `group` of `groups` would take (shard i -> group i % groups), member 0 writes."""
    if tp < 1 or world_size % tp:
        raise ValueError(f"tp {tp} does not divide world size {world_size}")
    return rank // tp, world_size // tp, rank % tp
