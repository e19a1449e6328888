"""pipeline/packing.py: window plans, window contents, the cross-document stream equal to today's windows, and packed
examples that do not see each other in real tiny models (block-diagonal masks from restarting position ids)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.chat import TokenizedExample
from pipeline.corpus import make_windows as corpus_windows
from pipeline.packing import PackingStats, iter_windows, make_windows, packing_masks_supported, plan_windows, stream_windows

PAD = 0


def example(ids, trained=None) -> TokenizedExample:
    ids = np.asarray(ids, np.int64)
    flags = np.ones(len(ids), np.uint8) if trained is None else np.asarray(trained, np.uint8)
    flags[0] = 0
    return TokenizedExample(ids, flags)


def segments(plan):
    return list(zip(plan.seg_window.tolist(), plan.seg_offset.tolist(), plan.seg_example.tolist(),
                    plan.seg_start.tolist(), plan.seg_length.tolist()))


def test_plan_never_straddles_an_example_that_fits():
    stats = PackingStats()
    # positions per example: 3, 4, 2, 6, 1 (lengths are tokens: positions + 1); the last one fills window 0's gap
    plan = plan_windows(np.array([4, 5, 3, 7, 2]), seq_len=8, stats=stats)
    assert segments(plan) == [(0, 0, 0, 0, 3), (0, 3, 1, 0, 4), (0, 7, 4, 0, 1), (1, 0, 2, 0, 2), (1, 2, 3, 0, 6)]
    assert (plan.windows, stats.examples, stats.positions, stats.padding) == (2, 5, 16, 0)
    # one open window: strict order, the gap stays padding
    strict = plan_windows(np.array([4, 5, 3, 7, 2]), seq_len=8, open_windows=1)
    assert [s[:3] for s in segments(strict)] == [(0, 0, 0), (0, 3, 1), (1, 0, 2), (1, 2, 3), (2, 0, 4)]
    unpacked = plan_windows(np.array([4, 5, 3]), seq_len=8, packing=False)
    assert [s[:2] for s in segments(unpacked)] == [(0, 0), (1, 0), (2, 0)]


def test_long_examples_split_or_truncate_and_are_counted():
    stats = PackingStats()
    plan = plan_windows(np.array([3, 20, 3]), seq_len=8, stats=stats)  # 2, 19, 2 positions
    assert segments(plan) == [(0, 0, 0, 0, 2), (0, 2, 1, 16, 3), (0, 5, 2, 0, 2), (1, 0, 1, 0, 8), (2, 0, 1, 8, 8)]
    assert (stats.split, stats.truncated, stats.positions) == (1, 0, 23)
    stats = PackingStats()
    plan = plan_windows(np.array([3, 20, 3, 1]), seq_len=8, long="truncate", stats=stats)
    assert segments(plan) == [(0, 0, 0, 0, 2), (0, 2, 2, 0, 2), (1, 0, 1, 0, 8)]
    assert (stats.truncated, stats.dropped_positions, stats.empty) == (1, 11, 1)
    assert "1 longer than a window truncated (11 positions dropped)" in stats.summary()


def test_window_contents_labels_masks_and_restarting_positions():
    a = example([10, 11, 12, 13], [0, 0, 1, 1])  # a prompt token, then two trained labels
    b = example([20, 21, 22], [0, 1, 1])
    c = example(list(range(30, 42)))  # 11 positions: a piece of 8 and one of 3
    padded = next(iter_windows([a, b], seq_len=8, pad_id=PAD))
    assert padded["input_ids"].tolist() == [[10, 11, 12, 20, 21, PAD, PAD, PAD]]
    assert padded["labels"].tolist() == [[11, 12, 13, 21, 22, PAD, PAD, PAD]]
    assert padded["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0]]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # padding continues the last block
    windows = list(iter_windows([a, b, c], seq_len=8, pad_id=PAD))
    assert len(windows) == 2
    first, second = windows
    assert first["input_ids"].tolist() == [[10, 11, 12, 20, 21, 38, 39, 40]]  # c's last piece fills the gap
    assert first["labels"].tolist() == [[11, 12, 13, 21, 22, 39, 40, 41]]
    assert first["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 1]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # a piece restarts at 0
    assert second["input_ids"].tolist() == [list(range(30, 38))]
    assert second["position_ids"].tolist() == [list(range(8))]
    # ranks take windows w % world_size; together they are the single-process windows
    split = [w for r in range(2) for w in iter_windows([a, b, c], 8, PAD, rank=r, world_size=2)]
    assert sorted(int(w["window_index"][0]) for w in split) == [0, 1]
    assert np.array_equal(split[1]["input_ids"], second["input_ids"])
    batched = list(iter_windows([a, b, c], 8, PAD, batch=2))
    assert batched[0]["input_ids"].shape == (2, 8) and batched[0]["window_index"].tolist() == [0, 1]


def test_cross_document_stream_equals_todays_windows():
    rng = np.random.default_rng(0)
    docs = [example(rng.integers(1, 300, n)) for n in (5, 17, 9, 30)]
    tokens = np.concatenate([d.input_ids for d in docs]).astype(np.uint16)
    trained = np.ones(len(tokens), np.uint8)
    n_windows = -(-(len(tokens) - 1) // 8)
    ours = stream_windows(tokens, trained, 0, n_windows, 8, PAD)
    theirs = corpus_windows(tokens, 0, n_windows, 8, PAD)
    for key, value in zip(("input_ids", "labels", "loss_mask"), theirs):
        assert np.array_equal(ours[key], value), key
    assert ours["position_ids"][1].tolist() == list(range(8))


def tiny_model(kind: str, attn: str, vocab: int):
    import torch
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64),
        "opt": lambda: tf.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=32),
        "bloom": lambda: tf.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4),
    }[kind]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_example_logprobs_equal_the_example_alone(kind, attn):
    """A teacher's log-probs for an example packed after another (restarting position ids) equal those of the example
    captured alone; with plain positions (cross-document attention) they do not."""
    import torch

    model = tiny_model(kind, attn, vocab=320)
    rng = np.random.default_rng(1)
    a, b = example(rng.integers(1, 320, 13)), example(rng.integers(1, 320, 17))

    def logprobs(window):  # (T, V)
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(window["input_ids"].astype(np.int64)),
                           position_ids=torch.from_numpy(window["position_ids"].astype(np.int64)), use_cache=False).logits
        return torch.log_softmax(logits[0].float(), -1)

    packed = next(iter_windows([a, b], seq_len=32, pad_id=PAD))
    alone = next(iter_windows([b], seq_len=32, pad_id=PAD))
    assert packed["input_ids"][0, 12:28].tolist() == alone["input_ids"][0, :16].tolist()
    together, by_itself = logprobs(packed)[12:28], logprobs(alone)[:16]
    torch.testing.assert_close(together, by_itself, atol=1e-5, rtol=1e-5)
    crossed = dict(packed, position_ids=np.arange(32, dtype=np.int32)[None])
    assert (logprobs(crossed)[12:28] - by_itself).abs().max() > 1e-2
    assert packing_masks_supported(model)


@pytest.mark.parametrize("kind,attn,expected", [("gpt2", "sdpa", True), ("opt", "eager", False), ("bloom", "eager", False)])
def test_models_that_ignore_position_ids_for_masking_are_found(kind, attn, expected):
    # OPT builds its mask from the attention mask only, Bloom (ALiBi) takes no position ids: packed examples see each other
    assert packing_masks_supported(tiny_model(kind, attn, vocab=320)) is expected


def test_example_files_round_trip_and_build_the_same_windows(tmp_path):
    from pipeline.packing import read_examples, write_examples

    rng = np.random.default_rng(2)
    examples = [example(rng.integers(1, 300, n), rng.integers(0, 2, n)) for n in (6, 3, 25, 9)]
    meta = write_examples(iter(examples), tmp_path, "uint16")
    assert meta == {"examples": 4, "tokens": 43, "trained": int(sum(e.trained.sum() for e in examples))}
    tokens, trained, offsets = read_examples(tmp_path, "uint16")
    assert offsets.tolist() == [0, 6, 9, 34, 43]
    plan = plan_windows(np.diff(offsets), seq_len=8)
    by_index = make_windows(tokens, trained, offsets, plan, 0, plan.windows, PAD)
    by_generator = list(iter_windows(examples, seq_len=8, pad_id=PAD))
    for key in ("input_ids", "labels", "loss_mask", "position_ids"):
        assert np.array_equal(by_index[key], np.concatenate([w[key] for w in by_generator])), key
    # max_tokens keeps examples whole
    assert write_examples(iter(examples), tmp_path, "uint16", max_tokens=20)["examples"] == 2
    assert not list(tmp_path.glob("*.tmp-*"))
