"""Logical targets <-> shard columns, for both encodings (`exact` and `compact`). Imports no torch.

The writer calls `encode_rows` (in its background thread); the reader calls `decode_topk` / `decode_sampled`, which
always return dense padded arrays: ids (R, T, M) int64 and log-probs (R, T, M) float32, padded slots -inf. A loss needs
nothing else, whichever encoding or target kind the dataset holds.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .bitpack import dequantize_logprobs, pack_bits, unpack_bits
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


def encode_rows(rows: dict, capture: Capture) -> dict:
    """Turn logical arrays into column values, as `capture` (the manifest's capture section) says.

    rows in: topk_ids (B,T,K) + topk_logprobs (B,T,K) float16 [exact] or topk_q (B,T,K), topk_hi/lo (B,T) [compact];
    sample_ids/sample_counts (B,T,N) padded + sample_n (B,T) [+ sample_logweights (B,T,N)].
    rows out: numpy arrays (fixed-size columns) or pyarrow arrays (lists, binaries).
    """
    out = {k: rows[k] for k in ("window_index", "input_ids", "labels", "loss_mask", "position_ids", "target_logprob") if k in rows}
    compact = capture.encoding == "compact"
    token_type = np.dtype(capture.token_dtype)
    if "topk" in capture.targets:
        if not compact:
            out["topk_ids"], out["topk_logprobs"] = rows["topk_ids"], rows["topk_logprobs"]
        else:
            ids, q = rows["topk_ids"], rows["topk_q"]
            out["topk_ids_packed"] = pa.array([pack_bits(w, capture.id_bits) for w in ids], pa.binary())
            out["topk_logprobs_packed"] = pa.array([pack_bits(w, capture.logprob_bits) for w in q], pa.binary())
            out["topk_logprob_hi"], out["topk_logprob_lo"] = rows["topk_hi"], rows["topk_lo"]
        if capture.log_norm_temperatures:
            out["log_norm"] = rows["log_norm"]  # (B, T, n) float32, both encodings
    if "sampled" in capture.targets:
        n = rows["sample_n"]
        out["sample_n"] = n.astype(capture.count_dtype)
        ids, counts = _ragged(rows["sample_ids"], n), _ragged(rows["sample_counts"], n)
        if not compact:
            out["sample_ids"], out["sample_counts"] = _list_array(ids, token_type), _list_array(counts, capture.count_dtype)
        else:
            # counts are >= 1, stored minus one
            out["sample_ids_packed"] = pa.array([pack_bits(w, capture.id_bits) for w in ids], pa.binary())
            out["sample_counts_packed"] = pa.array([pack_bits(w - 1, capture.count_bits) for w in counts], pa.binary())
        if capture.stores_weights:
            out["sample_logweights"] = _list_array(_ragged(rows["sample_logweights"], n), np.float16)
    return out


def decode_topk(col, capture: Capture, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """col(name) -> numpy column for the selected rows. Returns ids (R,T,K) int64, log-probs (R,T,K) float32."""
    K = capture.top_k
    if capture.encoding == "exact":
        return col("topk_ids").astype(np.int64), col("topk_logprobs").astype(np.float32)
    packed_ids, packed_q = col("topk_ids_packed"), col("topk_logprobs_packed")
    R = len(packed_ids)
    ids = np.stack([unpack_bits(b, capture.id_bits, seq_len * K) for b in packed_ids]).reshape(R, seq_len, K) if R else np.zeros((0, seq_len, K))
    q = np.stack([unpack_bits(b, capture.logprob_bits, seq_len * K) for b in packed_q]).reshape(R, seq_len, K) if R else np.zeros((0, seq_len, K))
    lp = dequantize_logprobs(q, col("topk_logprob_hi"), col("topk_logprob_lo"), capture.logprob_bits)
    return ids.astype(np.int64), lp


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
