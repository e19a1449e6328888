"""Value checks of a shard's columns: what checksums cannot catch (a dataset written wrong, or crafted with matching
checksums). Imports no torch.

`check_values` is what a loss needs to be right: ids inside the vocabulary, masks of 0/1, log-probs that are
probabilities (not NaN, never above 0), top-k sorted and distinct, sample counts that add up, list lengths that match
`sample_n`. `distill train` runs it on every shard the first time it opens it, before any batch of it is used, and
`distill verify` on every shard. `check_layout` adds the packing rules of docs/FORMAT.md ("Windows and positions"):
only `verify` runs it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..common.errors import FormatError
from .bitpack import unpack_bits
from .idcode import SORTED, IdCodeError, decode_sorted_ids
from .schema import TARGET_COLUMNS

# float16 rounding of stored log-probs may lift a top-k mass a little above 1; a real teacher never goes further.
MASS_TOLERANCE = 1e-2


class _Fail:
    def __init__(self, shard):
        self.shard = shard

    def __call__(self, column: str, msg: str):
        raise FormatError(f"{self.shard.where(self.shard.name + '.arrow')}: column {column}: {msg}; the dataset was "
                          "written wrong or altered: do not train on it (rerun `distill precompute`)")


def _first(bad: np.ndarray) -> str:
    """'window w, position t' of the first True of a (W, T[, ...]) mask."""
    idx = np.argwhere(bad)[0]
    return f"window {int(idx[0])}" + (f", position {int(idx[1])}" if len(idx) > 1 else "")


def _ids_in_vocab(fail, name: str, ids: np.ndarray, vocab: int) -> None:
    if ids.size and int(ids.max()) >= vocab:
        fail(name, f"token id {int(ids.max())} at {_first(ids >= vocab)} is outside the vocabulary of {vocab}")


def _logprobs(fail, name: str, lp: np.ndarray) -> None:
    """Log-probabilities: never NaN and never above 0 (-inf, a probability of 0, is allowed)."""
    bad = np.isnan(lp)
    if bad.any():
        fail(name, f"NaN at {_first(bad)}")
    bad = lp > 0
    if bad.any():
        fail(name, f"log-prob {float(lp[bad][0]):.4g} > 0 at {_first(bad)} (a probability above 1)")


def check_values(shard, kinds=None) -> None:
    """Raise FormatError naming the shard file, column, window and position of the first impossible value.

    kinds: the target kinds to check (default: all the dataset stores)."""
    ds = shard.dataset
    fail = _Fail(shard)
    V = ds.vocab_size
    col = shard.column
    for name in ("input_ids", "labels"):
        _ids_in_vocab(fail, name, col(name), V)
    mask = col("loss_mask")
    if mask.size and int(mask.max()) > 1:
        fail("loss_mask", f"value {int(mask.max())} at {_first(mask > 1)}, expected 0 or 1")
    valid = int(mask.sum())
    if shard.record.valid_tokens is not None and valid != shard.record.valid_tokens:
        fail("loss_mask", f"{valid} valid tokens but the manifest says {shard.record.valid_tokens}")
    if ds.capture.trained_only:
        _check_counts(shard, fail, mask.sum(1).astype(np.int64))
    _logprobs(fail, "target_logprob", col("target_logprob").astype(np.float32))
    for kind in kinds if kinds is not None else ds.target_kinds:
        if kind == "topk":
            _check_topk(shard, fail)
        elif kind == "sampled":
            _check_sampled(shard, fail)


def _check_counts(shard, fail, trained: np.ndarray) -> None:
    """Targets stored only where trained: every target column holds, per window, one entry per loss_mask 1.
    trained (W,): the windows' counts of loss_mask 1."""
    for name in TARGET_COLUMNS:
        if name in shard.table.column_names:
            lengths = shard.stored_counts(name)
            bad = lengths != trained
            if bad.any():
                w = int(np.argmax(bad))
                fail(name, f"window {w} holds {int(lengths[w])} entries but its loss_mask marks {int(trained[w])} trained "
                           "positions (targets are stored once per trained position)")


def _check_blobs(shard, fail, name: str, values_per_row: np.ndarray, bits: int) -> None:
    lengths = np.asarray(pa.compute.binary_length(shard.table.column(name)).to_numpy(zero_copy_only=False), np.int64)
    expected = -(-values_per_row * bits // 8)
    bad = lengths != expected
    if bad.any():
        w = int(np.argmax(bad))
        fail(name, f"window {w} holds {int(lengths[w])} bytes, expected {int(expected[w])} ({int(values_per_row[w])} values of {bits} bits)")


def _check_topk(shard, fail) -> None:
    ds, cap = shard.dataset, shard.dataset.capture
    K, V = ds.top_k, ds.vocab_size
    slack = 1.0
    stored = shard.stored_mask()  # (W, T): positions that hold targets
    if cap.encoding == "compact":
        per_row = stored.sum(1).astype(np.int64) * K
        if cap.topk_id_coding == SORTED:  # each blob an exact code of its positions' ids, all inside the vocabulary
            for w, blob in enumerate(shard.column("topk_ids_packed")):
                try:
                    decode_sorted_ids(blob, int(per_row[w]) // K, K, V)
                except IdCodeError as e:
                    fail("topk_ids_packed", f"window {w}: {e} (capture.topk_id_coding {SORTED})")
        else:
            _check_blobs(shard, fail, "topk_ids_packed", per_row, cap.id_bits)
        _check_blobs(shard, fail, "topk_logprobs_packed", per_row, cap.logprob_bits)
        hi = shard.column("topk_logprob_hi").astype(np.float32)
        lo = shard.column("topk_logprob_lo").astype(np.float32)
        for name, x in (("topk_logprob_hi", hi), ("topk_logprob_lo", lo)):
            bad = ~np.isfinite(x)
            if bad.any():
                fail(name, f"{float(x[bad][0])} at {_first(bad)}, expected a finite log-prob")
        _logprobs(fail, "topk_logprob_hi", hi)
        bad = lo > hi
        if bad.any():
            fail("topk_logprob_lo", f"above topk_logprob_hi at {_first(bad)} (the quantization range is reversed)")
        slack = np.exp(0.5 * (hi - lo) / ((1 << cap.logprob_bits) - 1))  # (W, T): half a quantization step
    ids, lp = shard.sparse_targets("topk")  # (W, T, K) each
    name = "topk_ids" if cap.encoding == "exact" else "topk_ids_packed"
    lp_name = "topk_logprobs" if cap.encoding == "exact" else "topk_logprobs_packed"
    _ids_in_vocab(fail, name, ids, V)
    _logprobs(fail, lp_name, lp)
    bad = (lp[..., 1:] > lp[..., :-1]).any(-1) & stored
    if bad.any():
        fail(lp_name, f"not sorted most probable first at {_first(bad)}")
    if K > 1:
        s = np.sort(ids, axis=-1)
        bad = (s[..., 1:] == s[..., :-1]).any(-1) & stored
        if bad.any():
            fail(name, f"an id stored twice at {_first(bad)}")
    mass = np.exp(lp.astype(np.float64)).sum(-1)  # (W, T)
    bad = mass > (1 + MASS_TOLERANCE) * slack
    if bad.any():
        fail(lp_name, f"probabilities sum to {float(mass[bad][0]):.4g} > 1 at {_first(bad)}")
    if cap.log_norm_temperatures:
        _check_log_norm(shard, fail, V)


def _check_log_norm(shard, fail, V: int) -> None:
    """log sum_v p_v^(1/T) lies between 0 and (1 - 1/T) log V (the ends: one certain token, the uniform distribution),
    for T > 1 as for T < 1 (then both are <= 0)."""
    temps = shard.dataset.capture.log_norm_temperatures
    x = shard.column("log_norm").astype(np.float64)  # (W, T, n)
    bad = ~np.isfinite(x)
    if bad.any():
        fail("log_norm", f"{float(x[bad][0])} at {_first(bad.any(-1))}, expected a finite log-normalizer")
    for i, t in enumerate(temps):
        end = (1 - 1 / t) * np.log(V)
        lo, hi = min(0.0, end), max(0.0, end)
        bad = (x[..., i] < lo - 1e-3) | (x[..., i] > hi + 1e-3)
        if bad.any():
            fail("log_norm", f"{float(x[..., i][bad][0]):.4g} at temperature {t:g} at {_first(bad)}, expected a value "
                             f"in [{lo:.4g}, {hi:.4g}] (between one certain token and the uniform distribution)")


def _check_sampled(shard, fail) -> None:
    ds, cap = shard.dataset, shard.dataset.capture
    N, V = cap.samples, ds.vocab_size
    n = shard.column("sample_n").astype(np.int64)  # (W, T); 0 where a "trained" dataset stores no targets
    stored = shard.stored_mask()  # (W, T)
    bad = ((n < 1) | (n > min(N, V))) & stored
    if bad.any():
        fail("sample_n", f"{int(n[bad][0])} unique ids at {_first(bad)}, expected 1..{min(N, V)}")
    per_row = n.sum(1)  # (W,)
    if cap.encoding == "compact":
        _check_blobs(shard, fail, "sample_ids_packed", per_row, cap.id_bits)
        _check_blobs(shard, fail, "sample_counts_packed", per_row, cap.count_bits)
        ids = [unpack_bits(b, cap.id_bits, int(k)) for b, k in zip(shard.column("sample_ids_packed"), per_row)]
        counts = [unpack_bits(b, cap.count_bits, int(k)).astype(np.int64) + 1 for b, k in zip(shard.column("sample_counts_packed"), per_row)]
        names = ("sample_ids_packed", "sample_counts_packed")
    else:
        ids, counts = shard.column("sample_ids"), shard.column("sample_counts")
        names = ("sample_ids", "sample_counts")
    lists = [(names[0], ids), (names[1], counts)]
    if cap.stores_weights:
        lists.append(("sample_logweights", shard.column("sample_logweights")))
    for name, rows in lists:
        lengths = np.array([len(r) for r in rows], np.int64)
        bad = lengths != per_row
        if bad.any():
            w = int(np.argmax(bad))
            fail(name, f"window {w} holds {int(lengths[w])} values but its sample_n adds up to {int(per_row[w])}")
    flat_ids = np.concatenate(ids).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
    flat_counts = np.concatenate(counts).astype(np.int64) if len(counts) else np.zeros(0, np.int64)
    if flat_ids.size and int(flat_ids.max()) >= V:
        fail(names[0], f"token id {int(flat_ids.max())} is outside the vocabulary of {V}")
    if flat_counts.size and int(flat_counts.min()) < 1:
        fail(names[1], "a count of 0 (only drawn ids are stored)")
    where = np.argwhere(stored)  # (P, 2) the stored positions in order: (window, position)
    starts = np.concatenate([[0], np.cumsum(n[stored])[:-1]])  # first entry of each stored position
    sums = np.add.reduceat(flat_counts, starts) if flat_counts.size else np.zeros(0, np.int64)
    bad = sums != N
    if bad.any():
        p = int(np.argmax(bad))
        fail(names[1], f"counts add up to {int(sums[p])} at window {int(where[p][0])}, position {int(where[p][1])}, "
                       f"expected capture.samples = {N}")
    step = np.diff(flat_ids)
    new_position = np.zeros(len(flat_ids), bool)
    new_position[starts] = True
    bad = (step <= 0) & ~new_position[1:]
    if bad.any():
        fail(names[0], "ids of a position are not distinct and ascending")
    if len(lists) == 3:
        w = np.concatenate(lists[2][1]).astype(np.float32) if len(lists[2][1]) else np.zeros(0, np.float32)
        if not np.isfinite(w).all():
            fail("sample_logweights", "a weight that is not finite")


def check_layout(shard) -> None:
    """The packing rules: consecutive window_index values; in version 1 a loss_mask of 1s then 0s only in the dataset's
    last window; in version 2 position_ids that restart at 0 or count up; labels equal to the next position's input
    wherever both are trained positions of one example."""
    ds = shard.dataset
    fail = _Fail(shard)
    start = ds.window_starts[int(shard.name)]  # names are checked to be the shard's position in the manifest
    wi = shard.column("window_index")
    expected = np.arange(start, start + shard.windows)
    bad = wi != expected
    if bad.any():
        w = int(np.argmax(bad))
        fail("window_index", f"window {w} has index {int(wi[w])}, expected {int(expected[w])} (shards hold consecutive windows)")
    mask = shard.column("loss_mask").astype(bool)  # (W, T)
    ids, labels = shard.column("input_ids"), shard.column("labels")
    if ds.manifest.format_version < 2:  # version 1: one stream, padding only at the end of the last window
        bad = mask[:, 1:] & ~mask[:, :-1]
        if bad.any():
            fail("loss_mask", f"a 1 after a 0 at {_first(bad)} (padding is only ever at the end)")
        last = start + shard.windows == ds.windows
        bad = ~mask.all(1)
        if last:
            bad[-1] = False
        if bad.any():
            fail("loss_mask", f"padding in window {int(np.argmax(bad))}, which is not the dataset's last window")
        follows = mask[:, :-1]
    else:  # version 2: position ids start at 0 or continue the previous position; labels checked inside an example
        pos = shard.column("position_ids").astype(np.int64)  # (W, T)
        bad = pos < 0  # (W, T)
        bad[:, 1:] |= (pos[:, 1:] != 0) & (pos[:, 1:] != pos[:, :-1] + 1)
        if bad.any():
            fail("position_ids", f"{_first(bad)} neither restarts at 0 nor continues the position before it")
        follows = mask[:, :-1] & mask[:, 1:] & (pos[:, 1:] == pos[:, :-1] + 1)
    bad = (labels[:, :-1] != ids[:, 1:]) & follows
    if bad.any():
        fail("labels", f"label differs from the next input at {_first(bad)} (labels are the inputs shifted by one)")
