"""`distill report`: valid PNGs of the right datasets and runs, a summary naming them, the entropy estimate's bounds."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.common.cli import main
from pipeline.common.errors import UserError
from pipeline.report import entropy_estimate, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher_dir, corpus_dir):
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    out = tmp_path_factory.mktemp("rep") / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=16, top_k=8,
                                hidden_layers=[1], batch_size=8, shard_size=8, max_tokens=24 * 16, progress=False))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset, tokenizer_dir):
    """Two real `distill train` runs (KD and CE-only), with eval points."""
    from transformers import LlamaConfig

    from trainer.config import TrainConfig
    from trainer.train import train

    root = tmp_path_factory.mktemp("rep-runs")
    cfg = root / "student.json"
    cfg.write_text(json.dumps(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False).to_dict()))
    out = []
    for name, alpha in (("kd-run", 0.5), ("ce-only", 1.0)):
        train(TrainConfig(data=str(dataset), out=str(root / name), student_config=str(cfg), batch_size=4, steps=6, lr=3e-3,
                          warmup=2, device="cpu", progress=False, save_every=1000, alpha=alpha, log_every=1,
                          eval_data=str(dataset), eval_every=3))
        out.append(root / name)
    return out


def test_dataset_and_runs_report(dataset, runs, tmp_path):
    out = tmp_path / "report"
    result = report([str(dataset), *map(str, runs)], str(out))
    assert result["datasets"] == ["ds"] and result["runs"] == ["kd-run", "ce-only"]
    w, h = png_size(out / "dataset-ds.png")
    assert 600 <= w <= 2000 and 200 <= h <= 1200
    w, h = png_size(out / "runs.png")
    assert 600 <= w <= 2000 and 300 <= h <= 1200
    md = (out / "report.md").read_text()
    for name in ("kd-run", "ce-only", "ds", "(dataset-ds.png)", "(runs.png)", "entropy", "hidden layer_1"):
        assert name in md, name
    # the figures in the summary are the dataset's own
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert f"{manifest['totals']['topk_mass_mean']:.3g}"[:4] in md
    last = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert f"{last['loss']:.4g}" in md
    # a second report into the same folder replaces the first; other folders are refused
    report([str(runs[1])], str(out))
    assert "kd-run" not in (out / "report.md").read_text() and "ce-only" in (out / "report.md").read_text()


def test_entropy_estimate_brackets_the_truth():
    rng = np.random.default_rng(0)
    V, K = 50, 5
    logits = rng.normal(size=(200, V)) * 2
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    true = -(np.exp(lp) * lp).sum(-1)
    top = -np.sort(-lp, axis=-1)[:, :K]
    est, low = entropy_estimate(top, V)
    assert (low <= true + 1e-9).all() and (true <= est + 1e-9).all()
    est_all, low_all = entropy_estimate(-np.sort(-lp, axis=-1), V)  # k = V: no tail, exact
    np.testing.assert_allclose(est_all, true, atol=1e-9)
    np.testing.assert_allclose(low_all, true, atol=1e-9)


def test_refusals(tmp_path, dataset):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="is not empty and holds no earlier report"):
        report([str(dataset)], str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(UserError, match="holds neither manifest.json"):
        report([str(tmp_path / "mine")], str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing written before every path was checked
    bad = tmp_path / "bad-run"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "lo')
    with pytest.raises(UserError, match="holds no metrics lines"):
        report([str(bad)], str(tmp_path / "r2"))


def test_cli_report(dataset, runs, tmp_path):
    res = CliRunner().invoke(main, ["report", str(runs[0]), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "runs.png" in res.output
    png_size(tmp_path / "r" / "runs.png")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r3")])
    assert res.exit_code == 2 and "no such folder" in res.output
