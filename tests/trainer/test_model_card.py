"""The end of a run: RUN/model/ (student, tokenizer, model card) apart from the checkpoints, checkpoints that load on
their own, the final eval logged once, and the default hidden-layer map when the dataset stores a single layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer.cli import eval_command


def evals(out: Path) -> list[dict]:
    return [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" in x]


def test_model_folder_card_and_checkpoints_outside_it(run_train, dataset_dir):
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, out = run_train(steps=4, save_every=2, eval_data=str(dataset_dir), eval_batches=2)
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in model_dir.iterdir()}
    assert not (model_dir / "checkpoints").exists() and not (out / "model.safetensors").exists()
    card = (model_dir / "README.md").read_text()
    assert f"**Teacher:** {json.loads((dataset_dir / 'manifest.json').read_text())['teacher']['name_or_path']}" in card
    assert f"**Dataset:** {dataset_dir}" in card and "0.5 * CE + 0.5 * forward_kl (tail: tail" in card
    assert f'"ce": {final["eval"]["ce"]}' in card and "AutoModelForCausalLM.from_pretrained" in card
    # what an upload of the model folder sends: no checkpoint, no optimizer state
    files = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    sent = list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    assert sent == files and not any("state.pt" in f or "checkpoint" in f for f in sent)

    ckpt = out / "checkpoints" / "step-000002"  # a checkpoint is a complete model folder, tokenizer included
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    assert AutoModelForCausalLM.from_pretrained(str(ckpt)) is not None and len(tok) == 320

    r = CliRunner().invoke(eval_command, ["--student", str(out), "--data", str(dataset_dir), "--device", "cpu",
                                          "--max-batches", "2", "--batch-size", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ce"] == pytest.approx(final["eval"]["ce"], rel=1e-5)


def test_final_eval_is_logged_once_also_when_a_finished_run_is_resumed(run_train, dataset_dir):
    _, out = run_train(steps=4, eval_data=str(dataset_dir), eval_every=2, eval_batches=1)
    assert [x["step"] for x in evals(out)] == [2, 4]
    run_train(out=out, steps=4, eval_data=str(dataset_dir), eval_every=2, eval_batches=1, resume=True)
    assert [x["step"] for x in evals(out)] == [2, 4]


@pytest.fixture(scope="module")
def last_layer_dataset(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    out = tmp_path_factory.mktemp("one-layer") / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=16, top_k=4,
                                hidden_layers=[-1], max_tokens=16 * 8, progress=False))
    return out


def test_default_layer_map_with_one_stored_layer(run_train, last_layer_dataset):
    final, out = run_train(data=str(last_layer_dataset), steps=2, hidden_weight=1.0)
    assert json.loads((out / "run.json").read_text())["hidden_layer_map"] == {"2": 2}  # last with last
    assert final["hidden"] > 0
