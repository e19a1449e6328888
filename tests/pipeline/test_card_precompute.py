"""precompute writes the dataset card (README.md) with the manifest; a bad --license is refused before any work."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.common.cli import main


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_precompute_writes_card_with_license(teacher_dir, corpus_dir, tmp_path):
    out = tmp_path / "ds"
    r = _run(["precompute", "--teacher", str(teacher_dir), "--data", str(corpus_dir), "--out", str(out), "--top-k", "4",
              "--seq-len", "32", "--batch-size", "2", "--shard-size", "4", "--max-tokens", "300", "--device", "cpu",
              "--license", "apache-2.0", "--no-progress"])
    assert r.exit_code == 0, r.output
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert card.startswith("---\n") and "license: apache-2.0" in card
    assert str(manifest["totals"]["tokens"]) in card.replace(",", "")
    # a card lost after the manifest (kill between the two writes) comes back on the rerun
    (out / "README.md").unlink()
    r = _run(["precompute", "--teacher", str(teacher_dir), "--data", str(corpus_dir), "--out", str(out), "--top-k", "4",
              "--seq-len", "32", "--batch-size", "2", "--shard-size", "4", "--max-tokens", "300", "--device", "cpu",
              "--license", "apache-2.0", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (out / "README.md").read_text() == card
    assert _run(["verify", str(out), "--no-progress"]).exit_code == 0


def test_bad_license_is_refused_before_work(teacher_dir, corpus_dir, tmp_path):
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, ["precompute", "--teacher", str(teacher_dir), "--data", str(corpus_dir), "--out", str(out),
                                  "--license", "Not A License", "--device", "cpu"])
    assert r.exit_code == 2
    assert "--license" in r.output and "Traceback" not in r.output
    assert not out.exists()
