"""Evaluation metrics on a hand-computed case, and `evaluate` on real models: the teacher against its own dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.common.errors import UserError
from pipeline.format import open_dataset
from trainer.config import EvalConfig
from trainer.evaluate import add_sums, evaluate, finish_metrics, metric_sums

# Two scored positions over a vocabulary of 3, and one ignored position (label -100, garbage values).
PROBS = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]
LABELS = [0, 1, -100]
T_IDS = [[0, 1], [1, 2], [2, 2]]
T_PROBS = [[0.6, 0.3], [0.5, 0.4], [1.0, 1.0]]  # teacher tails: 0.1 and 0.1


def hand_case():
    logits = torch.tensor(PROBS).log()
    return logits, torch.tensor(LABELS), torch.tensor(T_IDS), torch.tensor(T_PROBS).log()


def test_metrics_by_hand():
    m = finish_metrics(metric_sums(*hand_case()))
    assert m["tokens"] == 2
    ce = (-math.log(0.5) - math.log(0.1)) / 2  # -log q(label) at each scored position
    assert m["ce"] == pytest.approx(ce, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    # buckets: the teacher's ids plus a tail; position 1 student tail = 1 - 0.5 - 0.3 = 0.2, position 2: 1 - 0.1 - 0.8 = 0.1
    kl1 = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    kl2 = 0.5 * math.log(0.5 / 0.1) + 0.4 * math.log(0.4 / 0.8) + 0.1 * math.log(0.1 / 0.1)
    assert m["kl"] == pytest.approx((kl1 + kl2) / 2, rel=1e-5)
    # student argmax: 0 (teacher's top is 0: agree), 2 (teacher's top is 1: disagree)
    assert m["top1_agreement"] == pytest.approx(0.5)
    # confidence 0.5 and right; confidence 0.8 and wrong (label 1) -> |0.5 - 1| / 2 + |0.8 - 0| / 2
    assert m["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.8, rel=1e-5)
    assert m["accuracy"] == pytest.approx(0.5)


def test_sums_add_up_over_chunks():
    logits, labels, ids, lps = hand_case()
    whole = finish_metrics(metric_sums(logits, labels, ids, lps))
    parts = add_sums(metric_sums(logits[:1], labels[:1], ids[:1], lps[:1]), metric_sums(logits[1:], labels[1:], ids[1:], lps[1:]))
    assert finish_metrics(parts) == pytest.approx(whole)


def test_padded_slots_are_ignored():
    """Sampled targets pad each position's ids with id 0 at log-prob -inf: the result equals the unpadded one."""
    logits, labels, ids, lps = hand_case()
    padded_ids = torch.cat([ids, torch.zeros(3, 2, dtype=torch.long)], dim=1)  # (N, 4)
    padded_lps = torch.cat([lps, torch.full((3, 2), float("-inf"))], dim=1)
    padded = finish_metrics(metric_sums(logits, labels, padded_ids, padded_lps))
    assert padded == pytest.approx(finish_metrics(metric_sums(logits, labels, ids, lps)))


def test_kl_with_every_id_stored_has_no_tail_from_rounding():
    """k = V in float16 (the exact encoding's storage): the KL is the full-vocab KL up to the rounding of the stored
    values (1e-5 here), not a spurious tail bucket from 1 - sum(p) != 0 (2.6e-3 before)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 300, generator=g) * 2
    student = teacher + 0.5 * torch.randn(64, 300, generator=g)
    lp = torch.log_softmax(teacher, -1)
    ids = torch.argsort(torch.rand(64, 300, generator=g), -1)  # every id, shuffled
    labels = torch.randint(0, 300, (64,), generator=g)
    exact = (lp.exp() * (lp - torch.log_softmax(student, -1))).sum(-1).mean().item()
    stored = lp.gather(1, ids).half().float()
    assert finish_metrics(metric_sums(student, labels, ids, stored))["kl"] == pytest.approx(exact, abs=5e-5)


def test_ece_bins_are_equal_width():
    # two positions in the same bin [0.6, 0.7): one right one wrong -> |0.6+0.65 - 1| / 2; a perfect third in bin 9
    logits = torch.tensor([[0.6, 0.4, 0.0], [0.65, 0.35, 0.0], [1.0, 0.0, 0.0]]).clamp(min=1e-30).log()
    m = finish_metrics(metric_sums(logits, torch.tensor([0, 1, 0])))
    assert m["ece"] == pytest.approx(abs(0.6 + 0.65 - 1) / 3, abs=1e-6)
    assert m["kl"] is None and m["top1_agreement"] is None  # no teacher targets given


def test_all_masked_gives_no_metrics():
    m = finish_metrics(metric_sums(torch.zeros(2, 3), torch.tensor([-100, -100])))
    assert m["tokens"] == 0 and m["ce"] is None


def test_teacher_scored_on_its_own_dataset(dataset_dir, teacher_dir):
    """The teacher against the targets it produced: KL ~ 0, agreement ~ 1, CE = mean stored -log p(label)."""
    m = evaluate(EvalConfig(student=str(teacher_dir), data=str(dataset_dir), batch_size=16, device="cpu"))
    ds = open_dataset(dataset_dir)
    mask = np.concatenate([s.column("loss_mask").reshape(-1) for s in ds.shards]).astype(bool)
    target = np.concatenate([s.column("target_logprob").reshape(-1) for s in ds.shards])[mask]
    assert m["tokens"] == int(mask.sum())
    assert m["ce"] == pytest.approx(float(-target.mean()), rel=1e-4)
    assert 0 <= m["kl"] < 1e-3  # float16 storage of the teacher's log-probs
    assert m["top1_agreement"] > 0.99


def test_eval_refuses_an_incompatible_student(tmp_path, dataset_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.trainer.conftest import student_config_dict

    AutoModelForCausalLM.from_config(LlamaConfig(**student_config_dict(vocab=300))).save_pretrained(str(tmp_path / "s"))
    with pytest.raises(UserError, match="vocab size 300 differs from the teacher's 320"):
        evaluate(EvalConfig(student=str(tmp_path / "s"), data=str(dataset_dir), device="cpu"))


@pytest.mark.parametrize("k, padded", [(1, False), (5, False), (5, True), (40, False)])
def test_eval_kl_equals_the_loss_library(k, padded):
    """`distill eval`'s KL over the stored buckets is the loss library's forward KL with the tail bucket (T = 1), on
    random students and teachers: top-k (k = vocab included: no tail) and sampled-style rows with padded slots."""
    from trainer.losses.config import LossConfig
    from trainer.losses.plain import plain_distill_loss

    g = torch.Generator().manual_seed(k + padded)
    N, V = 24, 40
    logits = torch.randn(N, V, generator=g) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    teacher = torch.log_softmax(torch.randn(N, V, generator=g) * 3, -1)
    lp, ids = teacher.topk(k, dim=-1)  # (N, k) exact head log-probs, most probable first
    if padded:  # sampled rows store fewer distinct ids than slots: padded slots are -inf
        lp[:, 3:] = float("-inf")
    m = finish_metrics(metric_sums(logits, labels, ids, lp))
    cfg = LossConfig(loss="forward_kl", tail="tail", alpha=0.0, temperature=1.0)
    kd = plain_distill_loss(logits, labels, cfg, teacher_ids=ids, teacher_logprobs=lp).kd
    assert m["kl"] == pytest.approx(float(kd), rel=1e-4, abs=1e-6)
    assert m["kl"] > 0.01  # a real divergence, not two zeros
