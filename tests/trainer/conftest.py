"""Fixtures of stage two: a tiny dataset made with the real `precompute` (teacher and tokenizer from tests/conftest.py),
tiny students from configs, a `train(...)` helper, and hand-built datasets of chosen shard sizes for reader tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

T, K = 16, 8  # window length and stored top-k of the precomputed dataset
WINDOWS = 48  # windows in the precomputed dataset (3 shards of 16)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    """Top-8 targets and hidden states of teacher layers 1 and 2, 48 windows of 16 tokens in 3 shards (the stream layout;
    packed chat data: test_chat_capture.py)."""
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    out = tmp_path_factory.mktemp("trainer-ds") / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=T, top_k=K,
                                hidden_layers=[1, 2], batch_size=16, shard_size=16, max_tokens=WINDOWS * T, progress=False,
                                cross_document_attention=True))  # one stream: exactly WINDOWS windows
    return out


def student_config_dict(vocab: int = 320, **overrides) -> dict:
    from transformers import LlamaConfig

    config = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaConfig(**(config | overrides)).to_dict()


@pytest.fixture(scope="session")
def student_config(tmp_path_factory) -> Path:
    """config.json of a 2-layer, width-32 Llama student with the teacher's vocabulary."""
    path = tmp_path_factory.mktemp("student-config") / "config.json"
    path.write_text(json.dumps(student_config_dict()))
    return path


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A saved tiny student with the teacher's tokenizer (what --student PATH expects)."""
    from tests.conftest import save_tiny_model
    from transformers import LlamaConfig

    return save_tiny_model(LlamaConfig(**student_config_dict()), tokenizer_dir, tmp_path_factory.mktemp("student"), seed=1)


@pytest.fixture
def run_train(tmp_path, dataset_dir, student_config):
    """train(TrainConfig(...)) with tiny-test defaults; returns (final metrics, out folder)."""
    from trainer.config import TrainConfig
    from trainer.train import train

    def run(out=None, **kw):
        out = Path(out or tmp_path / "run")
        values = dict(data=str(dataset_dir), out=str(out), student_config=str(student_config), batch_size=4, steps=4,
                      lr=3e-3, warmup=2, device="cpu", progress=False, save_every=1000)
        values.update(kw)
        return train(TrainConfig(**values)), out

    return run


def write_fake_dataset(out: Path, shard_sizes: list[int], seq_len: int = 4, vocab: int = 50, top_k: int = 3,
                       hidden: dict[int, int] | None = None) -> Path:
    """A dataset written with the real ShardWriter but without a teacher: window w holds token ids derived from w,
    so tests can tell windows apart. Tokens and targets are arbitrary; only the layout is real."""
    from pipeline.common.files import write_json_atomic
    from pipeline.format import FORMAT_NAME, FORMAT_VERSION, ShardWriter, token_dtype, window_schema
    from pipeline.format.schema import schema_description

    tok = token_dtype(vocab)
    schema = window_schema(seq_len, tok, targets=("topk",) if top_k else (), top_k=top_k)
    records, start = [], 0
    for i, n in enumerate(shard_sizes):
        w = np.arange(start, start + n)
        ids = (w[:, None] * 7 + np.arange(seq_len)[None]) % vocab  # (n, T)
        mask = np.ones((n, seq_len), np.uint8)
        mask[:, -1] = 0
        rows = {"window_index": w, "input_ids": ids.astype(tok), "labels": ((ids + 1) % vocab).astype(tok), "loss_mask": mask,
                "position_ids": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)),
                "target_logprob": np.full((n, seq_len), -1.0, np.float32)}
        if top_k:
            rows["topk_ids"] = ((ids[..., None] + np.arange(top_k)) % vocab).astype(tok)
            rows["topk_logprobs"] = np.log(np.full((n, seq_len, top_k), 0.9 / top_k)).astype(np.float16)
        states = {layer: (w.repeat(seq_len)[:, None] + np.zeros((1, width))).astype(np.float16) for layer, width in (hidden or {}).items()}
        with ShardWriter(out, i, schema, n, seq_len, hidden or None) as writer:
            writer.write(rows, states or None)
            records.append(writer.finish().to_json())
        start += n
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "teacher": {"name_or_path": "fake", "vocab_size": vocab, "num_hidden_layers": 2, "hidden_size": 8,
                    "max_position_embeddings": 64},
        "tokenizer": {"sha256": "0" * 64, "vocab_size": vocab},
        "corpus": {"seq_len": seq_len},
        "capture": {"targets": ["topk"] if top_k else [], "top_k": top_k, "temperature": 1.0, "token_dtype": tok,
                    "encoding": "exact",
                    "hidden_layers": [{"index": k, "width": v} for k, v in (hidden or {}).items()]},
        "schema": schema_description(schema),
        "shards": records,
        "totals": {"windows": start, "shards": len(records)},
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out


@pytest.fixture
def fake_dataset(tmp_path):
    def make(shard_sizes, **kw):
        return write_fake_dataset(tmp_path / f"fake-{len(list(tmp_path.iterdir()))}", shard_sizes, **kw)

    return make
