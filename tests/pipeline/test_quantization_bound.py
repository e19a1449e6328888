"""The compact encoding's promise (docs/FORMAT.md): every decoded top-k log-prob is within half a quantization step of
the float32 value, at every allowed --logprob-bits, including ranges narrow enough that a float16 ulp of an end is
larger than a step (the case that broke it at 10+ bits when the ends were rounded to nearest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.format.bitpack import dequantize_logprobs
from pipeline.targets import quantize_logprobs

EPS32 = float(np.finfo(np.float32).eps)


def sorted_logprobs(seed: int, n: int, k: int, top: float, span: float) -> torch.Tensor:
    """(1, n, k) descending values in [top - span, top] with both ends present, float32."""
    g = torch.Generator().manual_seed(seed)
    x = top - span * torch.rand(1, n, k, generator=g)
    x[..., 0], x[..., -1] = top, top - span
    return x.sort(-1, descending=True).values


@pytest.mark.parametrize("bits", range(2, 17))
def test_decoded_logprobs_are_within_half_a_step(bits):
    cases = [(-0.0123, 0.02), (-3.3, 0.5), (-10.017, 0.04), (-9.99, 2.0), (-0.2, 25.0), (-17.3, 0.003)]
    for i, (top, span) in enumerate(cases):
        x = sorted_logprobs(i, 64, 32, top, span)
        qz = quantize_logprobs(x, bits)
        hi, lo = qz["topk_hi"].numpy(), qz["topk_lo"].numpy()
        decoded = dequantize_logprobs(qz["topk_q"].numpy(), hi, lo, bits)  # what a reader computes from the columns
        step = (hi.astype(np.float64) - lo) / ((1 << bits) - 1)  # (1, n) from the stored ends
        # float32 rounding of the decode (and of the encoder's division) adds a few ulps of the values' size
        bound = step[..., None] / 2 + 4 * EPS32 * np.abs(x.numpy()).max()
        err = np.abs(decoded.astype(np.float64) - x.numpy())
        assert (err <= bound).all(), (bits, top, span, float((err / step[..., None]).max()))
        assert (hi.astype(np.float32) >= x[..., 0].numpy()).all() and (lo.astype(np.float32) <= x[..., -1].numpy()).all()
        assert (hi <= 0).all()
