"""Format 2 stores targets and hidden states only where loss_mask is 1 (docs/FORMAT.md, "Targets only where the student
learns"). Two real captures of the same conversations, the same windows and the same teacher: one trains the assistant
turns, one trains every token. At the assistant positions both hold exactly the same targets, hidden states and sampled
draws; the first stores nothing elsewhere; the trainer's batches, losses and gradients are the same from either."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.format import open_dataset, verify_dataset
from pipeline.format.schema import TARGET_COLUMNS
from trainer.data import WindowReader
from trainer.evaluate import metric_sums
from trainer.losses.config import LossConfig
from trainer.losses.hidden import hidden_state_loss, make_projections
from trainer.losses.plain import plain_distill_loss

from .test_chat_capture import capture, chat_data, chat_teacher  # noqa: F401  (module fixtures)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, chat_teacher, chat_data):  # noqa: F811
    teacher, template = chat_teacher
    base = tmp_path_factory.mktemp("trained-positions")
    kw = dict(chat_template=str(template), targets="both", samples=6, hidden_layers=[-1], temperatures=[1, 2])
    capture(teacher, chat_data, base / "assistant", **kw)  # --train-on assistant (the chat default)
    capture(teacher, chat_data, base / "all", train_on="all", **kw)
    return base / "assistant", base / "all"


def test_stored_targets_at_trained_positions_equal_those_of_a_capture_that_trains_everything(pair):
    a, b = (open_dataset(p) for p in pair)
    verify_dataset(pair[0])
    verify_dataset(pair[1])
    assert a.capture.positions == b.capture.positions == "trained"
    assert a.windows == b.windows and len(a.shards) == len(b.shards) > 1
    total = 0
    for sa, sb in zip(a.shards, b.shards):
        ma, mb = sa.column("loss_mask").astype(bool), sb.column("loss_mask").astype(bool)  # (W, T)
        assert (ma <= mb).all()  # the assistant's tokens are among all tokens
        for name in ("input_ids", "labels", "position_ids"):  # the same windows
            np.testing.assert_array_equal(sa.column(name), sb.column(name))
        # one stored entry per trained position, nothing at the others
        for name in TARGET_COLUMNS:
            if name in sa.table.column_names:
                np.testing.assert_array_equal(sa.stored_counts(name), ma.sum(1))
                np.testing.assert_array_equal(sb.stored_counts(name), mb.sum(1))
                np.testing.assert_array_equal(sa.column(name)[ma], sb.column(name)[ma])  # bit for bit
                assert not sa.column(name)[~ma].any()
        for kind in ("topk", "sampled"):
            for x, y in zip(sa.sparse_targets(kind), sb.sparse_targets(kind)):
                np.testing.assert_array_equal(x[ma], y[ma])
        # the sampled lists hold the draws of the stored positions only
        assert sum(len(x) for x in sa.column("sample_ids")) == int(sa.column("sample_n")[ma].sum())
        layer = a.hidden_layers[0]
        assert sa.hidden(layer).shape[0] == int(ma.sum()) and sb.hidden(layer).shape[0] == int(mb.sum())
        rows = np.arange(sa.windows)
        ha, hb = sa.hidden_windows(layer, rows), sb.hidden_windows(layer, rows)  # (W, T, H)
        np.testing.assert_array_equal(ha[ma], hb[ma])
        assert not ha[~ma].any() and np.abs(ha[ma]).sum() > 0
        total += int(ma.sum())
    assert total == a.manifest.totals.valid_tokens < b.manifest.totals.valid_tokens
    # fewer stored positions, fewer bytes
    assert a.manifest.totals.bytes < b.manifest.totals.bytes


def test_the_trainer_sees_the_same_batches_losses_and_gradients(pair):
    kw = dict(batch_size=3, epochs=1, shuffle=False, targets="topk", hidden_layers=(a_layer(pair),), log_norm_temperature=2.0)
    ra, rb = WindowReader(str(pair[0]), **kw), WindowReader(str(pair[1]), **kw)
    batches_a, batches_b = list(ra), list(rb)
    assert len(batches_a) == len(batches_b) > 1
    V = open_dataset(pair[0]).vocab_size
    for x, y in zip(batches_a, batches_b):
        m = x["loss_mask"]  # the assistant's positions
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["position_ids"], y["position_ids"])
        assert torch.equal(x["labels"], y["labels"].masked_fill(~m, -100))
        for key in ("teacher_ids", "teacher_logprobs", "teacher_log_norm"):
            assert torch.equal(x[key][m], y[key][m]), key
        layer = next(iter(x["hidden"]))
        assert torch.equal(x["hidden"][layer][m], y["hidden"][layer][m])
        # the same training step: the targets at untrained positions (gone in x) never reach a loss or a gradient
        torch.manual_seed(0)
        logits = torch.randn(*x["input_ids"].shape, V, dtype=torch.float64)
        for cfg in (LossConfig(alpha=0.3, temperature=2.0), LossConfig(alpha=0.0, loss="reverse_kl", tail="uniform", temperature=2.0)):
            grads, losses = [], []
            for batch in (x, y):
                z = logits.clone().requires_grad_(True)
                out = plain_distill_loss(z, x["labels"], cfg, teacher_ids=batch["teacher_ids"], teacher_logprobs=batch["teacher_logprobs"],
                                         teacher_log_norm=batch["teacher_log_norm"])
                out.loss.backward()
                losses.append(out.loss.detach())
                grads.append(z.grad)
            assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
            assert torch.equal(grads[0], grads[1]) and torch.isfinite(grads[0]).all()
        # eval's metrics: over the trained positions only, the same
        flat = lambda t: t.flatten(0, 1)
        ea = metric_sums(flat(logits), flat(x["labels"]), flat(x["teacher_ids"]), flat(x["teacher_logprobs"]))
        eb = metric_sums(flat(logits), flat(x["labels"]), flat(y["teacher_ids"]), flat(y["teacher_logprobs"]))
        for key in ea:
            assert torch.equal(ea[key], eb[key]), key
        # hidden-state loss, masked by the trained positions
        proj = make_projections({0: layer}, x["hidden"][layer].shape[-1], x["hidden"][layer].shape[-1])
        student = {0: torch.randn(x["hidden"][layer].shape, generator=torch.Generator().manual_seed(1))}
        la = hidden_state_loss(student, {layer: x["hidden"][layer]}, proj, m, layer_map={0: layer})
        lb = hidden_state_loss(student, {layer: y["hidden"][layer]}, proj, m, layer_map={0: layer})
        assert torch.isfinite(la) and torch.equal(la, lb)


def a_layer(pair) -> int:
    return open_dataset(pair[0]).hidden_layers[0]
