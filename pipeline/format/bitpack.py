"""Fixed-width bit packing and log-prob quantization of the `compact` encoding (docs/FORMAT.md, "Compact encoding").

Pure numpy; the writer packs, the reader unpacks, and an outside reader can reimplement both from the spec in a few
lines. Value i of width w occupies stream bits [i*w, (i+1)*w), least significant bit first; stream bit j is bit j % 8 of
byte j // 8. The stream is zero-padded to a whole byte.
"""

from __future__ import annotations

import math

import numpy as np


def bits_for(max_value: int) -> int:
    """Bits needed to store every integer in [0, max_value]."""
    return max(1, math.ceil(math.log2(max_value + 1)))


def pack_bits(values: np.ndarray, width: int) -> bytes:
    values = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if values.size and int(values.max()) >= 1 << width:
        raise ValueError(f"value {int(values.max())} does not fit in {width} bits")
    bits = ((values[:, None] >> np.arange(width, dtype=np.uint64)) & 1).astype(np.uint8)  # (n, w)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: `count` unsigned integers of `width` bits -> uint32 array."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=count * width)
    weights = (1 << np.arange(width, dtype=np.uint64))
    return (bits.reshape(count, width).astype(np.uint64) @ weights).astype(np.uint32)


def dequantize_logprobs(q: np.ndarray, hi: np.ndarray, lo: np.ndarray, bits: int) -> np.ndarray:
    """lp = hi + (lo - hi) * q / (2**bits - 1), per position. q (..., K) uint; hi, lo (...,) float16 -> float32."""
    hi = hi.astype(np.float32)[..., None]
    lo = lo.astype(np.float32)[..., None]
    return hi + (lo - hi) * (q.astype(np.float32) / ((1 << bits) - 1))
