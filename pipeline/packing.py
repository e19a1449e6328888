"""Tokenized examples → windows of `seq_len` positions with input_ids, labels, loss_mask and position_ids.

Called by the capture (`pipeline.precompute`) after `pipeline.chat.tokenize_example`. An example of L tokens occupies
L - 1 positions: inputs ids[:-1], labels ids[1:], loss_mask trained[1:] (its last token is only a label; nothing is
predicted after it). Three layouts:

- packed (`--packing`, default for text): an example goes into the first of the few most recent windows with room for
  all of it, else it starts a new window (what is left of a window at the end is padding), so an example never
  straddles two windows when it fits in one. `position_ids` restart at 0 at each example: transformers
  builds a block-diagonal causal mask from them, so packed examples do not see each other (`packing_masks_supported`).
- unpacked (`--no-packing`): each example starts its own window; the rest is padding.
- cross-document (`--cross-document-attention`): today's pretraining stream: every token of every example in one
  stream, windows cut every `seq_len` positions, labels cross example boundaries, `position_ids` 0..T-1.

Longer examples (L - 1 > seq_len) are split into pieces of `seq_len` positions, each starting a window with
`position_ids` from 0 (a piece is trained as a document without its beginning; nothing is dropped). `long="truncate"`
keeps only the first piece. Either way `PackingStats` counts them for the manifest and the summary.
Padding positions have `pad_id` inputs and labels, loss_mask 0, and position_ids continuing those before them (so
they join the last example's block, which they can only follow, and never start a new one for a model).

`plan_windows` works on lengths alone, so the capture can know the number of windows up front and build any window by
index (`make_windows`), like `pipeline.corpus` does for the text stream: resume and ranks need no re-tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import os
from pathlib import Path

import numpy as np

LONG = ("split", "truncate")
# How many recent windows stay open for examples that fit: first fit over a few windows fills them far better than strict
# order (the held-out stdlib conversations at --seq-len 512: 95% of positions used instead of 79%), while an example
# moves back at most this many windows.
OPEN_WINDOWS = 8
# The capture's example files (in `_progress/`, beside today's tokens.bin): every example's tokens and trained flags one
# after another, and the offsets where each example starts.
EXAMPLE_FILES = ("example_tokens.bin", "example_trained.bin", "example_offsets.bin")


@dataclass
class PackingStats:
    """Counts for the manifest's corpus section and the printed summary."""

    examples: int = 0
    windows: int = 0
    positions: int = 0  # label positions of the examples placed (after truncation)
    trained: int = 0  # positions with loss_mask 1 (added by iter_windows or the capture; plans see lengths only)
    padding: int = 0  # padding positions
    split: int = 0  # examples longer than a window, split into pieces
    truncated: int = 0  # examples longer than a window, cut to one
    dropped_positions: int = 0  # positions lost to truncation
    empty: int = 0  # examples of one token (nothing to predict), skipped

    def summary(self) -> str:
        fill = self.positions / max(1, self.positions + self.padding)
        parts = [f"{self.examples} examples in {self.windows} windows ({fill:.1%} filled, {self.padding} padding positions)"]
        if self.trained:  # counted from the windows' loss masks by whoever builds them; plan_windows sees lengths only
            parts.append(f"{self.trained} trained positions of {self.positions}")
        if self.split:
            parts.append(f"{self.split} longer than a window split into pieces")
        if self.truncated:
            parts.append(f"{self.truncated} longer than a window truncated ({self.dropped_positions} positions dropped)")
        if self.empty:
            parts.append(f"{self.empty} of one token skipped")
        return "; ".join(parts)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Plan:
    """Where every piece of every example lands. Segment arrays are aligned, sorted by window then offset."""

    seq_len: int
    windows: int
    seg_window: np.ndarray  # (S,) window of the segment
    seg_offset: np.ndarray  # (S,) first position in the window
    seg_example: np.ndarray  # (S,) example index
    seg_start: np.ndarray  # (S,) first position within the example
    seg_length: np.ndarray  # (S,) positions
    window_first_seg: np.ndarray = field(default=None)  # (windows + 1,) segments of window w: [first[w], first[w+1])

    def __post_init__(self):
        if self.window_first_seg is None:
            self.window_first_seg = np.searchsorted(self.seg_window, np.arange(self.windows + 1))


def plan_windows(lengths: np.ndarray, seq_len: int, packing: bool = True, long: str = "split",
                 stats: PackingStats | None = None, open_windows: int = OPEN_WINDOWS) -> Plan:
    """Place examples of `lengths` tokens each (L, so L - 1 positions) into windows of `seq_len` positions.

    Packed: an example (or the last, partial piece of a split one) goes into the first of the `open_windows` most
    recent windows with room for all of it, else into a new window; full pieces take a new window each. Deterministic,
    and near the input order (an example moves back at most `open_windows` windows)."""
    if long not in LONG:
        raise ValueError(f"long={long!r}; expected one of {LONG}")
    stats = stats if stats is not None else PackingStats()
    T = seq_len
    win, off, ex, start, length = [], [], [], [], []
    used: dict[int, int] = {}  # open windows (the most recent, not full) -> positions used
    windows = 0
    for i, n_tokens in enumerate(np.asarray(lengths, np.int64)):
        n = int(n_tokens) - 1
        if n < 1:
            stats.empty += 1
            continue
        stats.examples += 1
        if n > T:
            if long == "split":
                stats.split += 1
            else:
                stats.truncated += 1
                stats.dropped_positions += n - T
                n = T
        for s in range(0, n, T):
            piece = min(T, n - s)
            w = next((w for w, u in used.items() if u + piece <= T), None) if packing else None
            if w is None:
                w, windows = windows, windows + 1
                used[w] = 0
                if len(used) > open_windows:
                    del used[min(used)]
            win.append(w), off.append(used[w]), ex.append(i), start.append(s), length.append(piece)
            used[w] += piece
            if used[w] == T or not packing:
                del used[w]
        stats.positions += n
    stats.windows += windows
    stats.padding += windows * T - sum(length)
    arrays = [np.asarray(a, np.int64) for a in (win, off, ex, start, length)]
    order = np.lexsort((arrays[1], arrays[0]))  # by window, then offset
    return Plan(T, windows, *(a[order] for a in arrays))


def make_windows(tokens: np.ndarray, trained: np.ndarray, offsets: np.ndarray, plan: Plan, first: int, count: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """Windows `first .. first+count-1` of `plan` from the examples' token stream.

    tokens (N,) and trained (N,): every example's tokens, one after another; offsets (E + 1,): example e is
    tokens[offsets[e]:offsets[e+1]]. Returns input_ids, labels (B, T) of tokens' dtype, loss_mask (B, T) uint8,
    position_ids (B, T) int32.
    """
    T = plan.seq_len
    input_ids = np.full((count, T), pad_id, dtype=tokens.dtype)
    labels = np.full((count, T), pad_id, dtype=tokens.dtype)
    loss_mask = np.zeros((count, T), np.uint8)
    position_ids = np.zeros((count, T), np.int32)
    for b, w in enumerate(range(first, first + count)):
        end = 0
        for s in range(plan.window_first_seg[w], plan.window_first_seg[w + 1]):
            o, n = int(plan.seg_offset[s]), int(plan.seg_length[s])
            a = int(offsets[plan.seg_example[s]] + plan.seg_start[s])  # first input token in the stream
            input_ids[b, o:o + n] = tokens[a:a + n]
            labels[b, o:o + n] = tokens[a + 1:a + n + 1]
            loss_mask[b, o:o + n] = trained[a + 1:a + n + 1]
            position_ids[b, o:o + n] = np.arange(n)
            end = o + n
        if end < T:  # padding continues the last block's positions
            last = position_ids[b, end - 1] + 1 if end else 0
            position_ids[b, end:] = last + np.arange(T - end)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def stream_windows(tokens: np.ndarray, trained: np.ndarray, first: int, count: int, seq_len: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """Cross-document windows (`--cross-document-attention`): today's `pipeline.corpus.make_windows` plus the trained
    flags and plain position ids. Window w holds inputs [wT, wT+T) and labels [wT+1, wT+T+1)."""
    n = len(tokens)
    pos = (first + np.arange(count))[:, None] * seq_len + np.arange(seq_len)[None, :]  # (B, T)
    has_label = pos + 1 < n
    input_ids = np.where(pos < n, tokens[np.minimum(pos, n - 1)], pad_id).astype(tokens.dtype)
    labels = np.where(has_label, tokens[np.minimum(pos + 1, n - 1)], pad_id).astype(tokens.dtype)
    loss_mask = (has_label & (trained[np.minimum(pos + 1, n - 1)] == 1)).astype(np.uint8)
    position_ids = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (count, seq_len)).copy()
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def iter_windows(examples: Iterable, seq_len: int, pad_id: int, packing: bool = True, long: str = "split",
                 stats: PackingStats | None = None, rank: int = 0, world_size: int = 1,
                 batch: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Generator form: `TokenizedExample`s → batches of up to `batch` windows (dicts of (B, T) arrays plus
    `window_index` (B,)); window w belongs to rank w % world_size. Holds the examples in memory: for tests and small
    corpora; the capture plans from lengths and builds windows by index instead."""
    examples = list(examples)
    lengths = np.asarray([len(e.input_ids) for e in examples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([e.input_ids for e in examples]) if examples else np.zeros(0, np.int64)
    trained = np.concatenate([e.trained for e in examples]) if examples else np.zeros(0, np.uint8)
    local = stats if stats is not None else PackingStats()
    plan = plan_windows(lengths, seq_len, packing, long, local)
    for w in range(rank, plan.windows, world_size * batch):
        idx = [v for v in range(w, min(plan.windows, w + world_size * batch), world_size)]
        rows = [make_windows(tokens, trained, offsets, plan, v, 1, pad_id) for v in idx]
        out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        out["window_index"] = np.asarray(idx, np.int64)
        local.trained += int(out["loss_mask"].sum())
        yield out


def write_examples(tokenized: Iterable, folder: Path, dtype: str, max_tokens: int | None = None,
                   progress=None) -> dict:
    """Write tokenized examples to the example files in `folder`, each atomically (temp name, then rename); return
    `{"examples", "tokens", "trained"}`. With `max_tokens`, stops before the example that would pass it (examples are
    kept whole), taking at least one. Read back with `read_examples`; plan with `plan_windows(np.diff(offsets), ...)`."""
    folder = Path(folder)
    paths = [folder / name for name in EXAMPLE_FILES]
    tmps = [p.with_name(p.name + f".tmp-{os.getpid()}") for p in paths]
    n_examples = n_tokens = n_trained = 0
    with open(tmps[0], "wb") as ft, open(tmps[1], "wb") as fm, open(tmps[2], "wb") as fo:
        fo.write(np.zeros(1, np.int64).tobytes())
        for ex in tokenized:
            n = len(ex.input_ids)
            if max_tokens is not None and n_examples and n_tokens + n > max_tokens:
                break
            ft.write(np.asarray(ex.input_ids, dtype=dtype).tobytes())
            fm.write(np.asarray(ex.trained, np.uint8).tobytes())
            n_examples, n_tokens, n_trained = n_examples + 1, n_tokens + n, n_trained + int(ex.trained.sum())
            fo.write(np.asarray([n_tokens], np.int64).tobytes())
            if progress:
                progress(n)
    for tmp, path in zip(tmps, paths):
        os.replace(tmp, path)
    return {"examples": n_examples, "tokens": n_tokens, "trained": n_trained}


def read_examples(folder: Path, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memory-mapped (tokens (N,), trained (N,) uint8, offsets (E + 1,) int64) of `write_examples`."""
    folder = Path(folder)
    maps = []
    for name, kind in zip(EXAMPLE_FILES, (dtype, np.uint8, np.int64)):
        path = folder / name
        maps.append(np.memmap(path, dtype=kind, mode="r") if path.stat().st_size else np.zeros(0, kind))
    return maps[0], maps[1], maps[2]


def packing_masks_supported(model, atol: float = 1e-5) -> bool:
    """Whether `model` keeps packed examples apart when given restarting `position_ids` (and no attention mask).

    A probe, not a list: transformers builds a block-diagonal causal mask from restarting position ids in the models
    that use its mask utilities (Llama, Qwen2, Mistral, Gemma, ... with sdpa and eager), while models that build their
    own mask or ignore position ids attend across examples. Two short random sequences are run packed (position ids
    restarting) and alone: the second's log-probs must match, to within a twentieth of what attending across the
    examples changes. Costs three forwards of at most 24 tokens.
    """
    import torch

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 8), generator=g), torch.randint(0, vocab, (1, 16), generator=g)
    packed = torch.cat([a, b], 1).to(device)

    def logprobs(ids, pos):  # (16, V) float32 log-probs of the last 16 positions
        with torch.inference_mode():
            out = model(input_ids=ids, position_ids=pos[None].to(device), use_cache=False).logits[0, -16:]
        return torch.log_softmax(out.float(), -1)

    alone = logprobs(b.to(device), torch.arange(16))
    restarted = logprobs(packed, torch.cat([torch.arange(8), torch.arange(16)]))
    shifted = logprobs(packed, torch.cat([torch.arange(8), 8 + torch.arange(16)]))  # attends across, positions as alone
    leak = float((restarted - alone).abs().max())
    # relative to what attending across the examples changes, so float32, bfloat16 and any scale are judged alike
    reference = float((shifted - alone).abs().max())
    return leak <= max(atol, 0.05 * reference)
