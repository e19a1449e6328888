"""Logical targets <-> shard columns, for both encodings (`exact` and `compact`). Imports no torch.

The writer calls `encode_rows` (in its background thread); the reader calls `decode_topk` / `decode_sampled`, which
always return dense padded arrays: ids (R, T, M) int64 and log-probs (R, T, M) float32, padded slots -inf. A loss needs
nothing else, whichever encoding or target kind the dataset holds. When targets are stored only at trained positions
(`capture.positions == "trained"`), `encode_rows` keeps a window's trained positions only (in position order), and the
reader's `col` scatters them back to (R, T, ...) (format.reader.Shard.column); compact blobs hold only those positions'
values, so `decode_topk` gets the stored-position mask to place them. Compact top-k ids are coded as
`capture.topk_id_coding` says (format.idcode): sorted per position and entropy-coded, with the quantized log-probs in
that id order (the reader sorts both back to rank order), or, in older datasets, bit-packed in rank order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .bitpack import dequantize_logprobs, pack_bits, unpack_bits, unpack_values
from .idcode import SORTED, decode_sorted_ids, encode_sorted_ids
from .schema import TARGET_COLUMNS
from .sections import Capture


def _ragged(values: np.ndarray, n: np.ndarray) -> list[np.ndarray]:
    """(B, T, N) padded + (B, T) counts -> per window, the valid entries of all positions concatenated."""
    valid = np.arange(values.shape[-1])[None, None, :] < n[..., None]  # (B, T, N)
    return [values[b][valid[b]] for b in range(values.shape[0])]


def _list_array(chunks: list[np.ndarray], dtype) -> pa.Array:
    offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    flat = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def fixed_lists(flat: np.ndarray, *sizes: int) -> pa.Array:
    """Wrap a C-contiguous numpy array as nested Arrow fixed-size lists without copying."""
    arr = pa.array(np.ascontiguousarray(flat).reshape(-1))
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def trained_lists(values: np.ndarray, mask: np.ndarray) -> pa.Array:
    """(B, T, ...) per-position values + (B, T) loss mask -> a list array with, per window, the values of its trained
    positions in position order (list<...> of the nested fixed-size lists of the trailing dims)."""
    keep = mask.astype(bool)
    flat = np.ascontiguousarray(values[keep])  # (P, ...) in window-major, position order
    inner = fixed_lists(flat, *flat.shape[1:]) if flat.ndim > 1 else pa.array(flat)
    offsets = np.zeros(len(keep) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(keep.sum(1))
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def encode_rows(rows: dict, capture: Capture) -> dict:
    """Turn logical arrays into column values, as `capture` (the manifest's capture section) says.

    rows in: topk_ids (B,T,K) + topk_logprobs (B,T,K) float16 [exact] or topk_q (B,T,K), topk_hi/lo (B,T) [compact];
    sample_ids/sample_counts (B,T,N) padded + sample_n (B,T) [+ sample_logweights (B,T,N)].
    rows out: numpy arrays (fixed-size columns) or pyarrow arrays (lists, binaries). With `capture.trained_only`, the
    target columns keep only positions whose loss_mask is 1 (lists per window; blobs and sample lists of those only).
    """
    out = {k: rows[k] for k in ("window_index", "input_ids", "labels", "loss_mask", "position_ids", "target_logprob") if k in rows}
    compact = capture.encoding == "compact"
    token_type = np.dtype(capture.token_dtype)
    keep = rows["loss_mask"].astype(bool) if capture.trained_only else None  # (B, T): the stored positions
    at = (lambda w, x: x[keep[w]]) if keep is not None else (lambda w, x: x)  # a window's stored positions
    if "topk" in capture.targets:
        if not compact:
            out["topk_ids"], out["topk_logprobs"] = rows["topk_ids"], rows["topk_logprobs"]
        else:
            ids, q = rows["topk_ids"], rows["topk_q"]  # (B, T, K) most probable first
            if capture.topk_id_coding == SORTED:  # ids ascending per position, the log-probs in the same order
                order = np.argsort(ids, axis=-1)  # (B, T, K)
                ids, q = np.take_along_axis(ids, order, -1), np.take_along_axis(q, order, -1)
                id_blobs = [encode_sorted_ids(at(i, w)) for i, w in enumerate(ids)]
            else:
                id_blobs = [pack_bits(at(i, w), capture.id_bits) for i, w in enumerate(ids)]
            out["topk_ids_packed"] = pa.array(id_blobs, pa.binary())
            out["topk_logprobs_packed"] = pa.array([pack_bits(at(i, w), capture.logprob_bits) for i, w in enumerate(q)], pa.binary())
            out["topk_logprob_hi"], out["topk_logprob_lo"] = rows["topk_hi"], rows["topk_lo"]
        if capture.log_norm_temperatures:
            out["log_norm"] = rows["log_norm"]  # (B, T, n) float32, both encodings
    if "sampled" in capture.targets:
        n = rows["sample_n"]
        out["sample_n"] = n.astype(capture.count_dtype)
        if keep is not None:
            n = np.where(keep, n, 0)  # (B, T): the samples of untrained positions are not stored
        ids, counts = _ragged(rows["sample_ids"], n), _ragged(rows["sample_counts"], n)
        if not compact:
            out["sample_ids"], out["sample_counts"] = _list_array(ids, token_type), _list_array(counts, capture.count_dtype)
        else:
            # counts are >= 1, stored minus one
            out["sample_ids_packed"] = pa.array([pack_bits(w, capture.id_bits) for w in ids], pa.binary())
            out["sample_counts_packed"] = pa.array([pack_bits(w - 1, capture.count_bits) for w in counts], pa.binary())
        if capture.stores_weights:
            out["sample_logweights"] = _list_array(_ragged(rows["sample_logweights"], n), np.float16)
    if keep is not None:
        for name in TARGET_COLUMNS:
            if name in out:
                out[name] = trained_lists(np.asarray(out[name]), keep)
    return out


def decode_topk(col, capture: Capture, seq_len: int, stored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """col(name) -> numpy column for the selected rows (per-position columns as (R, T, ...)). Returns ids (R,T,K) int64,
    log-probs (R,T,K) float32. stored (R, T) bool: the positions a compact blob holds (None: all T of each window)."""
    K = capture.top_k
    if capture.encoding == "exact":
        return col("topk_ids").astype(np.int64), col("topk_logprobs").astype(np.float32)
    packed_ids, packed_q = col("topk_ids_packed"), col("topk_logprobs_packed")
    hi, lo = col("topk_logprob_hi"), col("topk_logprob_lo")  # (R, T) float16
    R = len(packed_ids)
    full = stored is None or bool(stored.all())
    # Window by window, into the outputs: each window's arrays stay in cache (twice as fast as whole-batch arrays).
    ids = np.empty((R, seq_len, K), np.int64) if full else np.zeros((R, seq_len, K), np.int64)
    lp = np.empty((R, seq_len, K), np.float32) if full else np.zeros((R, seq_len, K), np.float32)
    bits, id_mask = capture.id_bits, (1 << capture.id_bits) - 1
    for r in range(R):
        at = slice(None) if full else stored[r]
        n = seq_len if full else int(stored[r].sum())
        q = unpack_values(packed_q[r], capture.logprob_bits, n * K).reshape(n, K)
        if capture.topk_id_coding == SORTED:
            # back to rank order: q ascending is log-prob descending; one sort of (q, id) keys also puts equal values
            # in ascending id order (several times faster than an argsort and two gathers)
            key = (q << bits) | decode_sorted_ids(packed_ids[r], n, K, 1 << bits)  # (n, K)
            key.sort(axis=-1)
            ids[r][at], q = key & id_mask, key >> bits
        else:
            ids[r][at] = unpack_values(packed_ids[r], bits, n * K).reshape(n, K)
        lp[r][at] = dequantize_logprobs(q, hi[r][at], lo[r][at], capture.logprob_bits)
    return ids, lp


def decode_sampled(col, capture: Capture, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids (R,T,M) int64 and estimated teacher log-probs (R,T,M) float32 = log(count/N) [+ log weight];
    M is the largest unique count among the rows; padded slots have id 0 and log-prob -inf."""
    n = col("sample_n").astype(np.int64)  # (R, T)
    R = len(n)
    M = max(1, int(n.max())) if n.size else 1
    if capture.encoding == "exact":
        flat_ids, flat_counts = col("sample_ids"), col("sample_counts")
    else:
        flat_ids = [unpack_bits(b, capture.id_bits, int(k)) for b, k in zip(col("sample_ids_packed"), n.sum(1))]
        flat_counts = [unpack_bits(b, capture.count_bits, int(k)) + 1 for b, k in zip(col("sample_counts_packed"), n.sum(1))]
    valid = np.arange(M)[None, None, :] < n[..., None]  # (R, T, M)
    ids = np.zeros((R, seq_len, M), dtype=np.int64)
    lp = np.full((R, seq_len, M), -np.inf, dtype=np.float32)
    logw = col("sample_logweights") if capture.stores_weights else None
    for r in range(R):
        ids[r][valid[r]] = flat_ids[r]
        est = np.log(np.asarray(flat_counts[r], dtype=np.float32) / capture.samples)
        if logw is not None:
            est = est + np.asarray(logw[r], dtype=np.float32)
        lp[r][valid[r]] = est
    return ids, lp
