"""Pure target functions on tiny tensors: top-k, fidelity, quantization, and sampled targets against the teacher."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.format.bitpack import bits_for, dequantize_logprobs, pack_bits, unpack_bits
from pipeline.targets import batch_generator, quantize_logprobs, sampled_targets, topk_targets


def logits_and_labels(B=2, T=5, V=50, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale, torch.randint(0, V, (B, T), generator=g)


def test_topk_values_and_tail_are_exact():
    logits, labels = logits_and_labels()
    t = topk_targets(logits, labels, 7, rows_per_chunk=1)
    lp = logits.log_softmax(-1)
    ref = lp.topk(7, -1)
    torch.testing.assert_close(t["topk_logprobs"], ref.values)
    torch.testing.assert_close(t["target_logprob"], lp.gather(-1, labels[..., None])[..., 0])
    torch.testing.assert_close(t["topk_mass"], ref.values.half().float().exp().sum(-1), atol=1e-6, rtol=1e-6)


def test_recon_kl_matches_a_direct_computation():
    logits, labels = logits_and_labels(V=30)
    k = 4
    t = topk_targets(logits, labels, k, fidelity_stride=1)
    p = logits.log_softmax(-1).exp().double()
    for b in range(2):
        for pos in range(5):
            ids = t["topk_ids"][b, pos]
            r = torch.empty(30, dtype=torch.float64)
            stored = t["topk_logprobs"][b, pos].half().double().exp()
            r[:] = (1 - stored.sum()) / (30 - k)
            r[ids] = stored
            kl = float((p[b, pos] * (p[b, pos] / r).log()).sum())
            assert math.isclose(float(t["recon_kl"][b, pos]), kl, rel_tol=1e-4, abs_tol=1e-6)


def test_k_equal_vocab_reconstructs_exactly():
    logits, labels = logits_and_labels(V=12)
    t = topk_targets(logits, labels, 12, fidelity_stride=2)
    assert t["recon_kl"].shape == (2, 3)
    assert float(t["recon_kl"].abs().max()) < 1e-3  # only float16 rounding of the head remains


def test_bitpack_round_trip_and_widths():
    rng = np.random.default_rng(0)
    for width in (1, 3, 7, 13, 17):
        values = rng.integers(0, 1 << width, size=101)
        np.testing.assert_array_equal(unpack_bits(pack_bits(values, width), width, 101), values)
        assert len(pack_bits(values, width)) == math.ceil(101 * width / 8)
    assert bits_for(8191) == 13 and bits_for(8192) == 14 and bits_for(1) == 1


def test_quantized_logprobs_stay_within_half_a_step():
    logits, _ = logits_and_labels(V=200)
    top = logits.log_softmax(-1).topk(64, -1).values
    for bits in (4, 7, 10):
        qz = quantize_logprobs(top, bits)
        hi, lo = qz["topk_hi"].float(), qz["topk_lo"].float()
        step = (hi - lo) / ((1 << bits) - 1)
        err = (qz["topk_stored"] - top).abs()
        assert bool((err <= step[..., None] / 2 + 2e-3).all())  # + float16 rounding of the range ends
        np.testing.assert_allclose(
            dequantize_logprobs(qz["topk_q"].numpy(), qz["topk_hi"].numpy(), qz["topk_lo"].numpy(), bits), qz["topk_stored"].numpy(), atol=1e-6)


def test_sample_counts_sum_to_n_and_ids_are_unique():
    logits, _ = logits_and_labels(B=3, T=4, V=40, scale=1.0)
    s = sampled_targets(logits, 16, 1.0, batch_generator(0, 0, torch.device("cpu")))
    assert bool((s["sample_counts"].sum(-1) == 16).all())
    n = s["sample_n"]
    for b in range(3):
        for t in range(4):
            ids = s["sample_ids"][b, t, : n[b, t]]
            assert len(set(ids.tolist())) == int(n[b, t]) and bool((s["sample_counts"][b, t, : n[b, t]] > 0).all())
            assert bool((s["sample_counts"][b, t, n[b, t] :] == 0).all())


def test_sampled_estimate_matches_the_teacher_distribution():
    """Many draws at one position: a chi-square test of the counts against the teacher's probabilities."""
    V, N = 20, 20000
    logits = torch.randn(1, 1, V, generator=torch.Generator().manual_seed(3)) * 1.5
    s = sampled_targets(logits, N, 1.0, batch_generator(1, 0, torch.device("cpu")))
    counts = torch.zeros(V)
    n = int(s["sample_n"][0, 0])
    counts[s["sample_ids"][0, 0, :n]] = s["sample_counts"][0, 0, :n].float()
    expected = logits[0, 0].softmax(-1) * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # 99.9th percentile of chi-square with 19 degrees of freedom


def test_importance_weights_make_tempered_sampling_unbiased():
    V, N = 15, 40000
    logits = torch.randn(1, 1, V, generator=torch.Generator().manual_seed(5)) * 2.0
    s = sampled_targets(logits, N, 2.0, batch_generator(2, 0, torch.device("cpu")))
    n = int(s["sample_n"][0, 0])
    est = torch.zeros(V)
    ids = s["sample_ids"][0, 0, :n]
    est[ids] = s["sample_counts"][0, 0, :n].float() / N * s["sample_logweights"][0, 0, :n].exp()
    p = logits[0, 0].softmax(-1)
    assert float((est - p).abs().max()) < 0.02
    # without the weights the counts follow the flattened q, clearly not p
    raw = torch.zeros(V)
    raw[ids] = s["sample_counts"][0, 0, :n].float() / N
    assert float((raw - p).abs().max()) > 0.05


def test_sampling_depends_only_on_seed_and_window():
    logits, _ = logits_and_labels(B=2, T=3, V=30, scale=1.0)
    a = sampled_targets(logits, 8, 1.0, batch_generator(7, 40, torch.device("cpu")))
    b = sampled_targets(logits, 8, 1.0, batch_generator(7, 40, torch.device("cpu")))
    c = sampled_targets(logits, 8, 1.0, batch_generator(7, 41, torch.device("cpu")))
    assert torch.equal(a["sample_ids"], b["sample_ids"]) and not torch.equal(a["sample_ids"], c["sample_ids"])
