"""The manifest's shape is part of the on-disk format: which keys each section holds, in which order, and the capture
section's values for a given command. Refactoring the code that builds or reads it must leave the bytes unchanged, so
these tests pin the shape of real captures (every encoding and target kind, hidden states, a sampling temperature).
"""

from __future__ import annotations

import json

import pytest

from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset
from pipeline.precompute import precompute

TEACHER = ["name_or_path", "revision", "model_type", "architectures", "config_sha256", "dtype", "vocab_size",
           "num_hidden_layers", "hidden_size", "max_position_embeddings", "parameters"]
TOKENIZER = ["class", "vocab_size", "sha256", "special_tokens", "bos_token_id", "eos_token_id", "pad_token_id", "path", "files"]
CORPUS = ["files", "file_count", "fingerprint", "text_column", "seq_len", "packing", "documents", "skipped_files",
          "corpus_tokens", "max_tokens", "layout", "formats", "train_on", "examples", "trained_tokens", "long_examples",
          "packing_stats"]
SETTINGS_HEAD = ["format_version", "teacher", "teacher_identity", "teacher_config_sha256", "teacher_dtype", "tokenizer_sha256",
                 "corpus_fingerprint", "text_column", "seq_len", "max_tokens", "format", "data_split", "data_config", "train_on",
                 "layout", "long_examples"]
SHARD = ["name", "windows", "tokens", "valid_tokens", "bytes", "files", "stats"]
BASE = {"batch_size": 2, "shard_size": 3, "world_size": 1}

# command options -> (capture section, capture keys of settings, shard stats, arrow columns)
CASES = {
    "exact-topk": (
        dict(targets="topk", top_k=8),
        {"targets": ["topk"], "top_k": 8, "temperature": 1.0, "encoding": "exact", "compression": "none",
         "token_dtype": "uint16", "hidden_layers": [], **BASE, "logprob_dtype": "float16"},
        ["targets", "top_k", "encoding", "compression", "hidden_layers", "batch_size", "shard_size"],
        ["recon_kl", "topk_mass"],
        ["window_index", "input_ids", "labels", "loss_mask", "position_ids", "target_logprob", "topk_ids", "topk_logprobs"],
    ),
    "exact-both-hidden-tau": (
        dict(targets="both", top_k=6, samples=300, sample_temperature=0.7, seed=3, hidden_layers=[1, -1]),
        {"targets": ["topk", "sampled"], "top_k": 6, "temperature": 1.0, "encoding": "exact", "compression": "none",
         "token_dtype": "uint16", "hidden_layers": [{"index": 1, "width": 48, "dtype": "float16"},
                                                    {"index": 2, "width": 48, "dtype": "float16"}],
         **BASE, "logprob_dtype": "float16", "samples": 300, "sample_temperature": 0.7, "seed": 3, "count_dtype": "uint16"},
        ["targets", "top_k", "samples", "sample_temperature", "seed", "encoding", "compression", "hidden_layers", "batch_size",
         "shard_size"],
        ["recon_kl", "sample_mass", "sample_rkl", "sample_unique", "topk_mass"],
        ["window_index", "input_ids", "labels", "loss_mask", "position_ids", "target_logprob", "topk_ids", "topk_logprobs", "sample_n",
         "sample_ids", "sample_counts", "sample_logweights"],
    ),
    "compact-both-zstd": (
        dict(targets="both", encoding="compact", top_k=5, logprob_bits=6, samples=20, compression="zstd", hidden_layers=[0]),
        {"targets": ["topk", "sampled"], "top_k": 5, "temperature": 1.0, "encoding": "compact", "compression": "zstd",
         "token_dtype": "uint16", "hidden_layers": [{"index": 0, "width": 48, "dtype": "float16"}], **BASE,
         "logprob_dtype": "uint6", "id_bits": 9, "logprob_bits": 6, "topk_id_coding": "sorted_expgolomb", "samples": 20,
         "sample_temperature": 1.0, "seed": 0, "count_dtype": "uint8", "count_bits": 5},
        ["targets", "top_k", "samples", "sample_temperature", "seed", "encoding", "logprob_bits", "compression",
         "hidden_layers", "batch_size", "shard_size", "topk_id_coding"],
        ["recon_kl", "sample_mass", "sample_rkl", "sample_unique", "topk_mass"],
        ["window_index", "input_ids", "labels", "loss_mask", "position_ids", "target_logprob", "topk_ids_packed", "topk_logprobs_packed",
         "topk_logprob_hi", "topk_logprob_lo", "sample_n", "sample_ids_packed", "sample_counts_packed"],
    ),
    "compact-sampled-tau": (
        dict(targets="sampled", encoding="compact", samples=9, sample_temperature=1.5),
        {"targets": ["sampled"], "top_k": 0, "temperature": 1.0, "encoding": "compact", "compression": "none",
         "token_dtype": "uint16", "hidden_layers": [], **BASE, "id_bits": 9, "samples": 9, "sample_temperature": 1.5,
         "seed": 0, "count_dtype": "uint8", "count_bits": 4},
        ["targets", "top_k", "samples", "sample_temperature", "seed", "encoding", "compression", "hidden_layers",
         "batch_size", "shard_size"],
        ["sample_mass", "sample_rkl", "sample_unique"],
        ["window_index", "input_ids", "labels", "loss_mask", "position_ids", "target_logprob", "sample_n", "sample_ids_packed",
         "sample_counts_packed", "sample_logweights"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_manifest_shape(case, tmp_path, teacher_dir, corpus_dir):
    options, capture, settings_capture, stats, columns = CASES[case]
    out = tmp_path / "out"
    cfg = PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=16, batch_size=2,
                           shard_size=3, max_tokens=100, progress=False, cross_document_attention=True, **options)
    precompute(cfg)
    raw = (out / "manifest.json").read_text()
    m = json.loads(raw)
    assert raw == json.dumps(m, indent=2) + "\n"  # the serialization itself
    assert list(m) == ["format", "format_version", "created_by", "teacher", "tokenizer", "corpus", "capture", "settings",
                       "schema", "shards", "totals"]
    assert m["format"] == "distill-logits" and m["format_version"] == 2
    assert list(m["created_by"]) == ["tool", "version", "command", "sessions"]
    assert list(m["created_by"]["sessions"][0]) == ["rank", "world_size", "shards", "tokens", "seconds", "tokens_per_second", "device"]
    assert list(m["teacher"]) == TEACHER and list(m["tokenizer"]) == TOKENIZER and list(m["corpus"]) == CORPUS
    assert json.dumps(m["capture"]) == json.dumps(capture)  # values and key order
    assert list(m["settings"]) == SETTINGS_HEAD + settings_capture
    assert all(m["settings"][k] == m["capture"][k] for k in settings_capture)
    assert list(m["schema"]) == columns
    windows = -(-100 // 16)
    assert [r["windows"] for r in m["shards"]] == [3, 3, 1] and [r["name"] for r in m["shards"]] == ["00000", "00001", "00002"]
    for r in m["shards"]:
        assert list(r) == SHARD and list(r["stats"]) == stats and list(r["files"]) == sorted(r["files"])
        assert list(r["files"][f"{r['name']}.arrow"]) == ["sha256", "bytes"]
    assert list(m["totals"]) == ["shards", "windows", "tokens", "valid_tokens", "bytes", "bytes_per_token"] + [
        f"{s}_mean" for s in ("topk_mass", "recon_kl", "sample_unique", "sample_mass", "sample_rkl") if s in stats]
    assert m["totals"]["windows"] == windows and m["totals"]["valid_tokens"] == 100

    # the reader's typed manifest writes back the same JSON; derived rules agree with the columns on disk
    ds = open_dataset(out)
    assert json.dumps(ds.manifest.to_json()) == json.dumps(m)
    assert ds.capture.stores_weights == ("sample_logweights" in m["schema"])
    assert ds.capture.schema(16).names == columns
    # an uncached view of a shard of its own: same rows, its own table
    view = ds.open_shard(1)
    assert view is not ds.shards[1] and view.table is not ds.shards[1].table and view.table.equals(ds.shards[1].table)
