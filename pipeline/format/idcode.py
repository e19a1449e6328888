"""Entropy-coded top-k ids of the `compact` encoding (`capture.topk_id_coding = "sorted_expgolomb"`; docs/FORMAT.md,
"Compact encoding"). Pure numpy, no torch: the writer encodes (format.encode), the reader and `verify` decode.

Why this code: a position's K ids, sorted ascending, are a set, and the gaps between neighbours are small where the
teacher's candidates crowd together. A BPE vocabulary gives its frequent tokens the low ids, so the gaps are short at the
low end and long at the high end: a heavy-tailed distribution that an Exp-Golomb code (whose code length grows with the
logarithm of the gap) fits better than a Rice code (linear growth). Sorting drops the rank order, which costs
log2(K!) bits (37 bytes at K = 64) to keep; the log-probs, stored in the same id order, give it back (the reader sorts
them). On the 13.8M teacher of BENCHMARKS.md at vocab 8192 the ids of top-64 take about 52 bytes a position instead of
104 at 13 bits each.

One window's blob (n = P*K ids, P stored positions):

    byte 0        k, the Exp-Golomb order (0..MAX_ORDER), the writer's cheapest for this window
    bytes 1..4    L, uint32 little-endian: the length in bytes of the prefix section
    L bytes       prefix section: for each gap, m zero bits then a one bit (m = its prefix length)
    the rest      suffix section: for each gap, its m + k low bits, LSB first, at consecutive bit offsets

Both sections are bit streams in the packing order of format.bitpack (stream bit j is bit j % 8 of byte j // 8),
zero-padded to whole bytes. Gap g (position-major, then ascending id: g = id_0, then id_j - id_{j-1} - 1) is coded with
x = g + 2**k, b = bit length of x minus 1, m = b - k, suffix = x - 2**b in b bits.
"""

from __future__ import annotations

import numpy as np

from .bitpack import MAX_READ_WIDTH, bit_length, read_bits, write_bits

CODINGS = ("packed", "sorted_expgolomb")
"""`capture.topk_id_coding`: "packed" = every id in `id_bits`, rank order (compact datasets written before the key
existed; absent means this); "sorted_expgolomb" = the code of this module."""
SORTED = "sorted_expgolomb"
HEADER = 5  # bytes: the order k, and the prefix section's length
MAX_ORDER = 32  # an order above the id width only wastes bits; a larger byte is a malformed blob


class IdCodeError(ValueError):
    """A blob that is not a valid sorted_expgolomb code for the expected number of ids."""


def _gaps(ids: np.ndarray) -> np.ndarray:
    """(P, K) ids ascending within a row -> (P*K,) int64 gaps >= 0."""
    ids = np.asarray(ids, np.int64)
    return (np.diff(ids, axis=1, prepend=-1) - 1).reshape(-1)


def best_order(gaps: np.ndarray, max_order: int = 16) -> int:
    """The Exp-Golomb order that codes `gaps` in the fewest bits (ties: the smallest)."""
    if gaps.size == 0:
        return 0
    values, counts = np.unique(gaps, return_counts=True)  # few distinct gaps: cost per order over them only
    costs = [int((counts * (2 * (bit_length(values + (1 << k)) - 1) - k + 1)).sum()) for k in range(max_order + 1)]
    return int(np.argmin(costs))


def encode_sorted_ids(ids: np.ndarray) -> bytes:
    """(P, K) ids, strictly ascending within each row -> one window's blob (module docstring)."""
    g = _gaps(ids)
    if g.size and int(g.min()) < 0:
        raise ValueError("ids must be strictly ascending within each position")
    k = best_order(g)
    x = g + (1 << k)
    b = bit_length(x) - 1  # (n,) >= k
    m = b - k
    ones = np.cumsum(m + 1) - 1  # (n,) bit index of each prefix's terminating one
    prefix_bits = np.zeros(int(ones[-1]) + 1 if g.size else 0, np.uint8)
    prefix_bits[ones] = 1
    prefix = np.packbits(prefix_bits, bitorder="little").tobytes()
    suffix = write_bits(x - (np.int64(1) << b), b)
    return bytes([k]) + len(prefix).to_bytes(4, "little") + prefix + suffix


def decode_sorted_ids(blob: bytes, positions: int, top_k: int, vocab: int) -> np.ndarray:
    """Inverse of encode_sorted_ids: (positions, top_k) int64, ascending within each row.

    Raises IdCodeError naming what is wrong when the blob is not a complete, exact code of positions*top_k ids, or
    holds an id at or above `vocab` (the reader passes 2**id_bits, `verify` the vocabulary size). Vectorized: the
    prefix lengths come from the positions of the set bits of the prefix section, the suffixes from one unaligned read
    each (format.bitpack.read_bits)."""
    n = positions * top_k
    if len(blob) < HEADER:
        raise IdCodeError(f"{len(blob)} bytes, shorter than the {HEADER}-byte header")
    k, plen = blob[0], int.from_bytes(blob[1:HEADER], "little")
    if k > MAX_ORDER:
        raise IdCodeError(f"Exp-Golomb order {k}, expected at most {MAX_ORDER}")
    if HEADER + plen > len(blob):
        raise IdCodeError(f"prefix section of {plen} bytes runs past the blob's {len(blob)} bytes")
    bits = np.unpackbits(np.frombuffer(blob, np.uint8, count=plen, offset=HEADER), bitorder="little")
    ones = np.flatnonzero(bits.view(bool))  # (n,) the end of each prefix (bits are 0/1: a bool view is exact, and fast)
    if len(ones) != n:
        raise IdCodeError(f"prefix section codes {len(ones)} ids, expected {n} ({positions} positions of {top_k})")
    if plen != (int(ones[-1]) // 8 + 1 if n else 0):
        raise IdCodeError(f"prefix section of {plen} bytes, its codes end in byte {int(ones[-1]) // 8 + 1 if n else 0}")
    widths = np.diff(ones, prepend=-1) - 1 + k  # (n,) b = m + k
    if n and int(widths.max()) > MAX_READ_WIDTH:
        raise IdCodeError(f"a gap code of {int(widths.max())} suffix bits, expected at most {MAX_READ_WIDTH}")
    starts = np.cumsum(widths) - widths
    total = int(widths.sum())
    if len(blob) - HEADER - plen != (total + 7) // 8:
        raise IdCodeError(f"suffix section of {len(blob) - HEADER - plen} bytes, expected {(total + 7) // 8} "
                          f"({total} bits)")
    suffix = read_bits(blob[HEADER + plen :], starts, widths)
    gaps = suffix + (np.int64(1) << widths) - (1 << k)  # x - 2**k
    if n and int(gaps.max()) >= vocab:  # checked before the sum, which could otherwise wrap around
        i = int(np.argmax(gaps >= vocab))
        raise IdCodeError(f"gap {int(gaps[i])} at stored position {i // top_k} is outside the vocabulary of {vocab}")
    run = np.cumsum(gaps + 1).reshape(positions, top_k)  # (P, K) one flat running sum (faster than one per row)
    ids = run - (run[:, :1] - gaps.reshape(positions, top_k)[:, :1])  # restart at each position: ids = run sums - 1
    if n and int(ids[:, -1].max()) >= vocab:
        p = int(np.argmax(ids[:, -1] >= vocab))
        raise IdCodeError(f"id {int(ids[p, -1])} at stored position {p} is outside the vocabulary of {vocab}")
    return ids
