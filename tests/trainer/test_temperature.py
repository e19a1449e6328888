"""train --temperature T on stored top-k: exact with the log-normalizer captured by precompute --temperatures, refused
without it, approximated (with a warning) only when asked. The first step's KD is recomputed independently from the
tiny real teacher's and student's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.cli import train_command

T, V = 16, 320  # window length; the teacher's vocabulary (tests/conftest.py)


@pytest.fixture(scope="module")
def one_document(tmp_path_factory, corpus_dir):
    """One short document: every window is a piece of it starting at position 0."""
    d = tmp_path_factory.mktemp("one-doc")
    (d / "textwrap.py").write_text((corpus_dir / "textwrap.py").read_text()[:700])
    return d


def capture(teacher_dir, data, out, top_k, temperatures):
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(data)], out=str(out), seq_len=T, top_k=top_k,
                                temperatures=temperatures, batch_size=8, shard_size=64, progress=False))
    return out


@pytest.fixture(scope="module")
def full_vocab_ds(tmp_path_factory, teacher_dir, one_document):
    return capture(teacher_dir, one_document, tmp_path_factory.mktemp("kv") / "ds", V, [1, 2])


@pytest.fixture(scope="module")
def top8_ds(tmp_path_factory, teacher_dir, one_document):
    return capture(teacher_dir, one_document, tmp_path_factory.mktemp("k8") / "ds", 8, [1, 2])


def first_step_kd(ds, out, student_config, temperature, **kw):
    """KD of the first (and only) step, over one batch holding every window of the dataset."""
    from pipeline.format import open_dataset
    from trainer.config import TrainConfig
    from trainer.train import train

    windows = open_dataset(ds).windows
    final = train(TrainConfig(data=str(ds), out=str(out), student_config=str(student_config), batch_size=windows, steps=1,
                              temperature=temperature, alpha=0.5, device="cpu", progress=False, save_every=1000, **kw))
    return final["kd"]


def logits_of(ds, teacher_dir, student_config):
    """Teacher and initial student logits (W, T, V) float64 on every window, the valid-position mask (W, T)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.format import open_dataset

    (shard,) = open_dataset(ds).shards
    ids = torch.from_numpy(shard.column("input_ids").astype(np.int64))
    mask = torch.from_numpy(shard.column("loss_mask").astype(bool))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    torch.manual_seed(0)  # what load_student does with --seed 0 before building the student from its config
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(student_config)), dtype=torch.float32)
    with torch.no_grad():
        return teacher(ids).logits.double(), student(ids).logits.double(), mask, shard


def dense_tempered_kd(teacher_logits, student_logits, mask, t):
    """T^2 * mean over valid positions of sum_v p_T (log p_T - log q_T), with p_T, q_T the softmaxes of logits / T."""
    p = torch.log_softmax(teacher_logits / t, -1)
    q = torch.log_softmax(student_logits / t, -1)
    kl = (p.exp() * (p - q)).sum(-1)  # (W, T)
    return float(kl[mask].mean()) * t * t


def test_full_vocabulary_top_k_at_t2_equals_dense_tempered_kd(tmp_path, full_vocab_ds, teacher_dir, student_config):
    teacher, student, mask, _ = logits_of(full_vocab_ds, teacher_dir, student_config)
    want = dense_tempered_kd(teacher, student, mask, 2.0)
    got = first_step_kd(full_vocab_ds, tmp_path / "run", student_config, 2.0)
    # the stored log-probs are float16: their rounding (< 4e-3 nats) reaches the tempered ones halved
    assert got == pytest.approx(want, rel=2e-3)


def test_top8_at_t2_uses_the_stored_log_norm(tmp_path, top8_ds, teacher_dir, one_document, student_config):
    """k < V, --tail tail: the exact tempered ghost bucket. Merging the ids outside the top 8 into one bucket can only
    lower the KL (the same tempered distributions, coarser), and the run's value equals the loss computed here from the
    stored top-k with a log-normalizer recomputed from the teacher's logits. The same top-8 captured without it and
    trained with --approximate-temperature gives the tail approximation's value instead."""
    from trainer.losses.config import LossConfig
    from trainer.losses.plain import plain_distill_loss

    teacher, student, mask, shard = logits_of(top8_ds, teacher_dir, student_config)
    ids, lps = shard.sparse_targets("topk")  # (W, T, 8)
    log_norm = torch.logsumexp(teacher / 2, -1) - torch.logsumexp(teacher, -1) / 2  # (W, T) float64
    labels = torch.from_numpy(shard.column("labels").astype(np.int64)).masked_fill(~mask, -100)

    def library_kd(**kw):
        return float(plain_distill_loss(student.float().flatten(0, 1), labels.flatten(),
                                        LossConfig(alpha=0.5, temperature=2.0, tail="tail"),
                                        teacher_ids=torch.from_numpy(ids).flatten(0, 1),
                                        teacher_logprobs=torch.from_numpy(lps).flatten(0, 1), **kw).kd)

    exact = first_step_kd(top8_ds, tmp_path / "exact", student_config, 2.0, tail="tail")
    assert exact == pytest.approx(library_kd(teacher_log_norm=log_norm.float().flatten()), rel=1e-4)
    dense = dense_tempered_kd(teacher, student, mask, 2.0)
    assert 0 < exact <= dense * (1 + 1e-4)
    flagged = first_step_kd(top8_ds, tmp_path / "flagged", student_config, 2.0, tail="tail", approximate_temperature=True)
    assert flagged == exact  # T stored: the flag changes nothing

    plain = capture(teacher_dir, one_document, tmp_path / "plain", 8, [1])
    approx = first_step_kd(plain, tmp_path / "approx", student_config, 2.0, tail="tail", approximate_temperature=True)
    assert approx == pytest.approx(library_kd(), rel=1e-4)
    assert abs(approx - dense) > 10 * abs(exact - dense) or abs(approx - exact) > 0.1


def test_unstored_temperature_is_refused_with_the_fix(tmp_path, top8_ds, student_config):
    args = ["--data", top8_ds, "--student-config", student_config, "--steps", 1, "--batch-size", 4, "--device", "cpu",
            "--no-progress", "--temperature", 4]
    r = CliRunner().invoke(train_command, [str(a) for a in args + ["--out", tmp_path / "refused"]])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "--temperature 4:" in lines[0] and "stores the teacher's log-normalizer at temperatures 2" in lines[0]
    assert "rerun precompute with --temperatures 1,4, or pass --approximate-temperature" in lines[0]
    assert not (tmp_path / "refused" / "checkpoints").exists()

    r = CliRunner().invoke(train_command, [str(a) for a in args + ["--out", tmp_path / "approx", "--approximate-temperature"]])
    assert r.exit_code == 0, r.output
    assert "warning: --approximate-temperature: the dataset has no log-normalizer at T = 4 (stored: 2)" in r.stderr
    metrics = [json.loads(x) for x in (tmp_path / "approx" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(m.get("kd", np.nan)) for m in metrics)


def test_dataset_without_log_norm_refuses_t2_but_not_t1(tmp_path, teacher_dir, one_document, student_config):
    from pipeline.common.errors import UserError

    ds = capture(teacher_dir, one_document, tmp_path / "plain", 8, [1])
    with pytest.raises(UserError, match=r"temperatures none \(besides 1\).*--temperatures 1,2"):
        first_step_kd(ds, tmp_path / "t2", student_config, 2.0)
    assert np.isfinite(first_step_kd(ds, tmp_path / "t1", student_config, 1.0))
