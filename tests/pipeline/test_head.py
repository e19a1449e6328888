"""The chunked capture head (pipeline/head.py) on tiny random teachers of several architectures: the split head gives
the model's own logits (final norm, Cohere logit_scale, Gemma soft-capping), chunked targets equal whole-batch targets,
and a capture with --head-chunk writes the same shards as the whole-batch capture. Unknown heads fall back, with a notice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import PrecomputeConfig, parse_max_memory
from pipeline.head import ChunkedHead, chunk_slices, chunked_targets, tp_groups
from pipeline.precompute import precompute
from pipeline.targets import sampled_targets, topk_targets
from tests.conftest import save_tiny_model

T, K = 32, 8


def make_config(arch: str, vocab: int, eos: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=eos, eos_token_id=eos)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if arch == "gemma2":  # a small cap, so soft-capping changes the values a lot
        return tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=3.0)
    if arch == "cohere":
        return tf.CohereConfig(**common, logit_scale=0.25)
    if arch == "granite":  # divides its logits by logits_scaling: a head structure not in the allowlist
        return tf.GraniteConfig(**common, logits_scaling=4.0)
    raise ValueError(arch)


ARCHS = ["llama", "gpt2", "qwen2", "qwen3", "gemma2", "gemma3", "cohere"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = save_tiny_model(make_config(arch, len(tok), tok.eos_token_id), tokenizer_dir, tmp_path_factory.mktemp(arch))
        return made[arch]

    return get


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_chunk_slices_cover_the_batch_once_and_keep_fidelity_positions():
    for B, T_, chunk in [(3, 32, 100), (3, 32, 32), (2, 32, 12), (2, 30, 8), (1, 32, 3), (4, 16, 1000)]:
        seen = np.zeros((B, T_), int)
        for rows, pos in chunk_slices(B, T_, chunk):
            seen[rows, pos] += 1
            assert pos.start % 8 == 0
        assert (seen == 1).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_split_head_gives_the_models_logits_and_chunked_targets_equal_whole(arch, teachers):
    model = load(teachers(arch))
    head, why = ChunkedHead.split(model, 12)
    assert head is not None, why
    ids = torch.randint(0, model.config.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, model.config.vocab_size, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert head.verify(ids) is None
        ref = model(input_ids=ids, use_cache=False).logits  # (3, T, V)
        h = head.body_forward(ids, False).last_hidden_state
        torch.testing.assert_close(head.logits(h), ref, rtol=1e-5, atol=1e-5)
        if model.config.model_type in ("gemma2", "gemma3_text"):
            assert float(ref.abs().max()) <= 3.0  # the cap is applied (the raw head goes far past it)
            assert float(head.head(h).abs().max()) > 3.5
        t, s = chunked_targets(head, h, labels, K, None, (16, 1.0, torch.Generator().manual_seed(5)))
        t_ref = topk_targets(ref, labels, K)
        s_ref = sampled_targets(ref, 16, 1.0, torch.Generator().manual_seed(5))
    assert set(t) == set(t_ref) and set(s) == set(s_ref)
    assert torch.equal(t["topk_ids"], t_ref["topk_ids"])
    for name in ("topk_logprobs", "target_logprob", "topk_mass", "recon_kl"):
        torch.testing.assert_close(t[name], t_ref[name], rtol=1e-5, atol=1e-5)
    for name in ("sample_ids", "sample_counts", "sample_n"):
        assert torch.equal(s[name], s_ref[name]), name


def run(teacher, data, out, **kw):
    cfg = dict(teacher=str(teacher), data=[str(d) for d in data], out=str(out), seq_len=T, top_k=K, batch_size=3,
               shard_size=4, progress=False, max_tokens=400, targets="both", samples=8)
    cfg.update(kw)
    return precompute(PrecomputeConfig(**cfg))


def shard_files(manifest) -> dict[str, str]:
    return {f"{s['name']}/{name}": meta["sha256"] for s in manifest["shards"] for name, meta in s["files"].items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_with_head_chunk_writes_the_same_shards(arch, teachers, corpus_dir, tmp_path, capsys):
    whole = run(teachers(arch), [corpus_dir], tmp_path / "whole", head_chunk=0)
    chunked = run(teachers(arch), [corpus_dir], tmp_path / "chunked", head_chunk=12)  # pieces of windows
    assert "--head-chunk" not in capsys.readouterr().err  # no fallback notice: the split head was used
    assert shard_files(whole) == shard_files(chunked) and len(whole["shards"]) >= 3  # byte-identical shard files


def test_unknown_head_falls_back_with_a_notice_and_same_values(teachers, corpus_dir, tmp_path, capsys):
    model = load(teachers("granite"))
    head, why = ChunkedHead.split(model, 12)
    assert head is None and "granite" in why
    # forced past the allowlist, the first-batch check sees that lm_head alone is not this model's head
    forced = ChunkedHead(model, 12)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert "differs from the model's logits" in forced.verify(ids)
    whole = run(teachers("granite"), [corpus_dir], tmp_path / "whole", head_chunk=0, targets="topk")
    capsys.readouterr()
    chunked = run(teachers("granite"), [corpus_dir], tmp_path / "chunked", head_chunk=12, targets="topk")
    err = capsys.readouterr().err
    assert err.count("--head-chunk") == 1 and "using the whole-batch head" in err
    assert shard_files(whole) == shard_files(chunked)


def test_placement_settings_are_checked():
    from pipeline.common.errors import UserError

    base = dict(teacher="t", data=["d"], out="o", rank=0, world_size=4)
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    for bad, said in [(dict(head_chunk=-1), "--head-chunk is -1"), (dict(max_memory="0=1GiB"), "--max-memory needs --device-map"),
                      (dict(device_map="auto", max_memory="gpu0"), "not DEVICE=SIZE"), (dict(tp=3), "--tp 3 does not divide the 4"),
                      (dict(tp=2, device_map="auto"), "pass one of them"), (dict(device_map="everywhere"), "--device-map is 'everywhere'"),
                      (dict(attn_implementation="fast"), "--attn-implementation is 'fast'")]:
        with pytest.raises(UserError, match=said):
            PrecomputeConfig(**base, **bad).resolve()
    cfg = PrecomputeConfig(**base, tp=2, attn_implementation="eager").resolve()
    assert cfg.load_options() == {"attn_implementation": "eager", "device_map": None, "max_memory": None, "tp_plan": "auto", "tp_size": 2}


def test_device_map_split_with_max_memory_writes_the_same_shards(teachers, corpus_dir, tmp_path):
    """accelerate's placement: with a tiny CPU budget the embeddings stay on the CPU and the rest (lm_head included) is
    offloaded; the capture, chunked head included, writes what the single-device capture writes."""
    pytest.importorskip("accelerate")
    from pipeline.teacher import load_teacher

    model = load_teacher(str(teachers("llama")), None, torch.float32, torch.device("cpu"), False, device_map="auto",
                         max_memory=parse_max_memory("cpu=150KB"))
    placed = set(model.hf_device_map.values())
    assert "cpu" in placed and len(placed) > 1  # really split
    plain = run(teachers("llama"), [corpus_dir], tmp_path / "plain", head_chunk=0)
    for chunk in (0, 12):
        split = run(teachers("llama"), [corpus_dir], tmp_path / f"split{chunk}", head_chunk=chunk, device_map="auto", max_memory="cpu=150KB")
        assert shard_files(split) == shard_files(plain)


def test_tp_groups_assign_shards_to_replicas_as_ranks_were():
    assert [tp_groups(r, 8, 8) for r in (0, 7)] == [(0, 1, 0), (0, 1, 7)]
    groups = [tp_groups(r, 16, 8) for r in range(16)]
    assert groups[:8] == [(0, 2, m) for m in range(8)] and groups[8:] == [(1, 2, m) for m in range(8)]
    writers = [r for r in range(16) if groups[r][2] == 0]
    assert writers == [0, 8]
    # shard i belongs to group i % groups, exactly as it belonged to rank i % world_size with one process per replica
    n_shards = 11
    by_group = {g: [s for s in range(n_shards) if s % 2 == g] for g in range(2)}
    assert by_group == {0: [0, 2, 4, 6, 8, 10], 1: [1, 3, 5, 7, 9]}
    assert tp_groups(5, 6, 1) == (5, 6, 0)  # --tp 1: every rank its own replica, as today
    with pytest.raises(ValueError):
        tp_groups(0, 6, 4)
