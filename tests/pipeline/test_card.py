"""The dataset card: `datasets.load_dataset(folder)` reads the rows through its YAML, and it states the manifest's figures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from pipeline.card import dataset_card, write_card
from pipeline.common.errors import UserError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher_dir, corpus_dir):
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    out = tmp_path_factory.mktemp("card") / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=16, top_k=8,
                                batch_size=8, shard_size=8, max_tokens=20 * 16, progress=False))
    return out


def test_load_dataset_reads_the_rows(dataset, tmp_path):
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    manifest = json.loads((dataset / "manifest.json").read_text())
    write_card(dataset, manifest, license="apache-2.0")
    rows = datasets.load_dataset(str(dataset), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(rows) == manifest["totals"]["windows"] == 20
    assert set(manifest["schema"]) == set(rows.column_names)
    # the rows are the shards' rows, in order
    import pyarrow as pa

    first = pa.ipc.open_stream(pa.memory_map(str(dataset / "shards" / "00000.arrow"))).read_all()
    assert rows[0]["input_ids"] == first.column("input_ids")[0].as_py()
    assert sorted(r["window_index"] for r in rows) == list(range(20))
    np.testing.assert_allclose(np.asarray(rows[3]["topk_logprobs"], dtype=np.float32),
                               np.asarray(first.column("topk_logprobs")[3].as_py(), dtype=np.float32))


def test_card_states_the_manifest_figures(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    text = dataset_card(manifest, license="cc-by-4.0")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0"
    assert "knowledge-distillation" in meta["tags"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.arrow"}]}]
    t = manifest["totals"]
    for figure in (manifest["teacher"]["name_or_path"], f"{manifest['teacher']['parameters']:,}", f"{t['windows']:,}",
                   f"{t['valid_tokens']:,}", f"{t['bytes']:,}", f"{t['bytes_per_token']:.4g}", f"{t['topk_mass_mean']:.4g}",
                   f"{t['recon_kl_mean']:.4g}", "top-8", manifest["tokenizer"]["sha256"][:16],
                   f"{manifest['corpus']['documents']:,}", "distill train --data"):
        assert figure in text, figure


def test_card_without_license_and_bad_license(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    meta = yaml.safe_load(dataset_card(manifest).split("---\n")[1])
    assert "license" not in meta
    with pytest.raises(UserError, match="--license 'Apache 2.0' is not a license identifier"):
        dataset_card(manifest, license="Apache 2.0")


def test_write_card_is_atomic_and_replaces_only_the_card(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    before = sorted(p.name for p in dataset.iterdir())
    path = write_card(dataset, manifest, license="mit")
    assert path == dataset / "README.md" and "license: mit" in path.read_text()
    assert sorted(p.name for p in dataset.iterdir()) == sorted(set(before) | {"README.md"})
    from pipeline.format import verify_dataset

    verify_dataset(str(dataset))  # a card beside the manifest does not make the dataset unsound
