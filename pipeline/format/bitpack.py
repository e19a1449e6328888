"""Fixed-width bit packing and log-prob quantization of the `compact` encoding (docs/FORMAT.md, "Compact encoding").

Pure numpy; the writer packs, the reader unpacks, and an outside reader can reimplement both from the spec in a few
lines. Value i of width w occupies stream bits [i*w, (i+1)*w), least significant bit first; stream bit j is bit j % 8 of
byte j // 8. The stream is zero-padded to a whole byte. `write_bits` / `read_bits` are the variable-width form (value i
at a given bit offset, of its own width) that the entropy-coded ids use (format.idcode).
"""

from __future__ import annotations

import functools
import math

import numpy as np

# read_bits reads 8 bytes at a value's first byte: a value of up to 64 - 7 bits fits whatever its bit offset.
MAX_READ_WIDTH = 57


def bits_for(max_value: int) -> int:
    """Bits needed to store every integer in [0, max_value]."""
    return max(1, math.ceil(math.log2(max_value + 1)))


def bit_length(x: np.ndarray) -> np.ndarray:
    """Per element, the number of bits of a non-negative integer below 2**53 (0 -> 0), as int64."""
    return np.frexp(np.asarray(x, np.float64))[1].astype(np.int64)


def write_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate value i in its widths[i] low bits, LSB first, zero-padded to a whole byte (widths may be 0)."""
    values = np.asarray(values, np.uint64).reshape(-1)
    widths = np.asarray(widths, np.int64).reshape(-1)
    starts = np.cumsum(widths) - widths  # (n,) bit offset of each value
    owner = np.repeat(np.arange(len(values)), widths)  # (total,) which value each stream bit belongs to
    shift = (np.arange(len(owner)) - starts[owner]).astype(np.uint64)
    bits = ((values[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes()


def read_bits(data: bytes, offsets: np.ndarray, widths) -> np.ndarray:
    """Value i = the widths[i] bits (<= MAX_READ_WIDTH; `widths` an array or one int for all) starting at bit
    offsets[i] of `data`, LSB first -> int64.

    Vectorized: each value is one little-endian 8-byte read at its first byte, a shift and a mask (no dtype passes:
    non-negative int64 arrays are viewed as uint64)."""
    offsets = np.asarray(offsets, np.int64)
    buf = np.frombuffer(bytes(data) + bytes(8), np.uint8)
    words = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))  # words[j] = bytes j..j+7, unaligned
    words = np.ascontiguousarray(words)  # an aligned copy: gathering from it is several times faster
    if np.isscalar(widths):
        mask = np.uint64((1 << int(widths)) - 1)
    else:
        mask = (np.uint64(1) << np.asarray(widths, np.int64).view(np.uint64)) - np.uint64(1)
    out = (words[offsets >> 3] >> (offsets & 7).view(np.uint64)) & mask
    return out.view(np.int64)


def pack_bits(values: np.ndarray, width: int) -> bytes:
    values = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if values.size and int(values.max()) >= 1 << width:
        raise ValueError(f"value {int(values.max())} does not fit in {width} bits")
    bits = ((values[:, None] >> np.arange(width, dtype=np.uint64)) & 1).astype(np.uint8)  # (n, w)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


@functools.lru_cache(maxsize=64)
def _fixed_offsets(width: int, count: int) -> np.ndarray:
    """Bit offsets of `count` values of `width` bits (cached: a reader decodes blobs of the same size again and again)."""
    offsets = np.arange(count, dtype=np.int64) * width
    offsets.flags.writeable = False
    return offsets


def unpack_values(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: `count` unsigned integers of `width` bits -> int64 array."""
    if len(data) * 8 < count * width:
        raise ValueError(f"{len(data)} bytes hold fewer than {count} values of {width} bits")
    return read_bits(data, _fixed_offsets(width, count), width)


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """unpack_values as uint32."""
    return unpack_values(data, width, count).astype(np.uint32)


def dequantize_logprobs(q: np.ndarray, hi: np.ndarray, lo: np.ndarray, bits: int) -> np.ndarray:
    """lp = hi + (lo - hi) * q / (2**bits - 1), per position. q (..., K) uint; hi, lo (...,) float16 -> float32."""
    hi = hi.astype(np.float32)[..., None]
    lo = lo.astype(np.float32)[..., None]
    return hi + (lo - hi) * (q.astype(np.float32) / ((1 << bits) - 1))
