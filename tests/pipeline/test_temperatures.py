"""precompute --temperatures: the stored tempered log-normalizer, recomputed from the tiny real teacher's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.common.errors import FormatError, UserError
from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset, verify_dataset
from pipeline.precompute import precompute

T, K = 16, 8


@pytest.fixture(scope="module")
def one_document(tmp_path_factory, corpus_dir):
    """A corpus of one long document: every window is a piece of it starting at position 0, whatever the packing."""
    d = tmp_path_factory.mktemp("one-doc")
    (d / "textwrap.py").write_text((corpus_dir / "textwrap.py").read_text()[:1000])
    return d


def capture(teacher, data, out, **kw):
    cfg = dict(teacher=str(teacher), data=[str(data)], out=str(out), seq_len=T, top_k=K, batch_size=3, shard_size=4,
               progress=False) | kw
    return precompute(PrecomputeConfig(**cfg))


def independent_log_norm(logits: torch.Tensor, t: float) -> torch.Tensor:
    """log sum_v p_v^(1/T) = logZ(z / T) - logZ(z) / T, in float64 from the raw logits (not the capture's route)."""
    z = logits.double()
    return torch.logsumexp(z / t, -1) - torch.logsumexp(z, -1) / t


@pytest.mark.parametrize("head_chunk", [512, 5])  # whole windows per chunk, and pieces of 8 positions
def test_stored_log_norm_equals_an_independent_recomputation(tmp_path, teacher_dir, one_document, head_chunk):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ds"
    m = capture(teacher_dir, one_document, out, temperatures=[1.0, 2.0, 0.5], head_chunk=head_chunk)
    assert m["capture"]["log_norm_temperatures"] == [0.5, 2.0]  # ascending, 1 needs nothing
    assert m["capture"]["positions"] == "trained"  # the last window is padded: targets only where loss_mask is 1
    assert m["schema"]["log_norm"] == "list<item: fixed_size_list<item: float>[2]>"  # one entry per trained position
    assert m["settings"]["log_norm_temperatures"] == [0.5, 2.0]
    verify_dataset(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    ds = open_dataset(out)
    checked = 0
    for shard in ds.shards:
        ids, mask = shard.column("input_ids").astype(np.int64), shard.column("loss_mask").astype(bool)
        stored = shard.column("log_norm")  # (W, T, 2)
        assert stored.dtype == np.float32
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)).logits  # (W, T, V); causal: trailing padding changes nothing before it
        for i, t in enumerate((0.5, 2.0)):
            want = independent_log_norm(logits, t).numpy()
            np.testing.assert_allclose(stored[..., i][mask], want[mask], atol=2e-5, rtol=1e-5)
            np.testing.assert_array_equal(shard.log_norm(t), stored[..., i])
        assert shard.log_norm(4.0) is None and not shard.log_norm(1.0).any()
        checked += int(mask.sum())
    assert checked == ds.manifest.totals.valid_tokens > 0
    # the bounds: (1 - 1/T) log V at T = 2 is above every value, 0 below; at T = 0.5 the other way round
    assert (stored[..., 1][mask] > 0).all() and (stored[..., 0][mask] < 0).all()
    assert not mask.all() and (stored[~mask] == 0).all()  # nothing stored at the padding: it reads as 0


def test_without_temperatures_nothing_changes(tmp_path, teacher_dir, one_document):
    m = capture(teacher_dir, one_document, tmp_path / "ds")
    assert "log_norm_temperatures" not in m["capture"] and "log_norm" not in m["schema"]
    assert open_dataset(tmp_path / "ds").capture.log_norm_temperatures == ()


def test_resume_with_other_temperatures_is_refused(tmp_path, teacher_dir, one_document):
    out = tmp_path / "ds"
    capture(teacher_dir, one_document, out, temperatures=[1.0, 2.0])
    with pytest.raises(UserError, match=r"log_norm_temperatures: \[2.0\] → \[4.0\]"):
        capture(teacher_dir, one_document, out, temperatures=[1.0, 4.0])
    plain = tmp_path / "plain"
    capture(teacher_dir, one_document, plain)
    with pytest.raises(UserError, match=r"log_norm_temperatures: None → \[2.0\]"):
        capture(teacher_dir, one_document, plain, temperatures=[1.0, 2.0])


def test_cli_temperatures(tmp_path, teacher_dir, one_document):
    from pipeline.cli import commands

    out = tmp_path / "ds"
    base = ["precompute", "--teacher", str(teacher_dir), "--data", str(one_document), "--seq-len", str(T), "--top-k", "4",
            "--max-tokens", "40", "--no-progress"]
    r = CliRunner().invoke(commands, base + ["--out", str(out), "--temperatures", "1,2,x"])
    assert r.exit_code == 2 and "--temperatures" in r.output and "'1,2,x' is not a comma-separated list" in r.output
    r = CliRunner().invoke(commands, base + ["--out", str(out), "--temperatures", "1,-2"])
    assert r.exit_code == 2 and "--temperatures has -2.0; expected positive numbers" in r.output
    r = CliRunner().invoke(commands, base + ["--out", str(out), "--temperatures", "2", "--targets", "sampled"])
    assert r.exit_code == 2 and "stores log-normalizers for top-k targets" in r.output
    r = CliRunner().invoke(commands, base + ["--out", str(out), "--temperatures", "1,2,4"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["capture"]["log_norm_temperatures"] == [2.0, 4.0]
    r = CliRunner().invoke(commands, ["inspect", str(out), "--json"])
    s = json.loads(r.output)
    assert s["exact_temperatures"] == [1.0, 2.0, 4.0] and s["recon_kl_positions"].startswith("every 8th")
    text = CliRunner().invoke(commands, ["inspect", str(out)]).output
    line = next(x for x in text.splitlines() if x.startswith("recon_kl_mean"))
    assert line.endswith("(measured on every 8th position, not all)") and f"{s['recon_kl_mean']:.4g}" in line


@pytest.mark.parametrize("bad", [[1.0], [4.0, 2.0], [2.0, 2.0], ["2"], [0.0], 2.0])
def test_reader_refuses_a_bad_temperature_list(tmp_path, teacher_dir, one_document, bad):
    out = tmp_path / "ds"
    capture(teacher_dir, one_document, out, temperatures=[1.0, 2.0])
    m = json.loads((out / "manifest.json").read_text())
    m["capture"]["log_norm_temperatures"] = bad
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="capture.log_norm_temperatures"):
        open_dataset(out)
