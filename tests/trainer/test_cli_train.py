"""`distill train` / `distill eval` through click: config files, flag overrides, one-line errors, light imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from trainer.cli import eval_command, train_command

REPO = Path(__file__).resolve().parents[2]


def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def test_config_file_with_flag_override_then_eval(tmp_path, dataset_dir, student_config):
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": str(dataset_dir), "out": str(out), "student-config": str(student_config),
                                      "steps": 2, "batch_size": 4, "device": "cpu", "progress": False})
                      + "lr: 1e-3\n")  # YAML reads this as a string; the loader converts it
    result = invoke(train_command, "--config", config, "--steps", 3)
    assert result.exit_code == 0, result.output
    assert "saved student to" in result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["steps"] == 3 and run["config"]["batch_size"] == 4 and run["config"]["lr"] == 1e-3

    result = invoke(eval_command, "--student", out, "--data", dataset_dir, "--batch-size", 16, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) >= {"ce", "perplexity", "kl", "top1_agreement", "ece", "tokens"}
    text = invoke(eval_command, "--student", out, "--data", dataset_dir, "--max-batches", 1, "--device", "cpu")
    assert text.exit_code == 0 and text.stdout.startswith("ce ") and "nats/token" in text.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path, dataset_dir, student_config):
    missing = invoke(train_command, "--out", tmp_path / "o", "--student-config", student_config)
    assert missing.exit_code == 2 and missing.stderr.strip() == "error: missing --data; pass it as flags or in --config"
    both = invoke(train_command, "--data", dataset_dir, "--out", tmp_path / "o", "--student", "x", "--student-config", "y")
    assert both.exit_code == 2 and "give exactly one of --student" in both.stderr and len(both.stderr.splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": "d", "out": "o", "batch": 3}))
    unknown = invoke(train_command, "--config", bad)
    assert unknown.exit_code == 2 and "unknown keys ['batch']" in unknown.stderr
    bad.write_text("data: d\nout: o\nsteps: many\n")
    wrong_type = invoke(train_command, "--config", bad)
    assert wrong_type.exit_code == 2 and "wrong type (steps: 'many')" in wrong_type.stderr
    choice = invoke(train_command, "--loss", "mse")
    assert choice.exit_code == 2 and "forward_kl" in choice.output


def test_commands_import_no_torch():
    code = "import sys, trainer.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_beta_reaches_the_jsd_loss_from_the_cli(tmp_path, dataset_dir, student_config):
    """--beta (JSD mixture weight) is a flag with LossConfig's help and default; bad values are refused in one line, a good
    one is recorded in run.json and trains."""
    from trainer.losses.config import LossConfig

    help_text = invoke(train_command, "--help").output
    assert "--beta FLOAT" in help_text and f"[default: {LossConfig.beta}]" in help_text and "JSD mixture weight" in help_text
    bad = invoke(train_command, "--data", dataset_dir, "--out", tmp_path / "bad", "--student-config", student_config, "--beta", 1)
    assert bad.exit_code == 2 and "--beta is 1.0; expected a value strictly between 0 and 1" in bad.stderr
    out = tmp_path / "run"
    ok = invoke(train_command, "--data", dataset_dir, "--out", out, "--student-config", student_config, "--loss", "jsd",
                "--beta", 0.25, "--steps", 1, "--batch-size", 4, "--device", "cpu", "--no-progress")
    assert ok.exit_code == 0, ok.output
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["beta"] == 0.25 and run["config"]["loss"] == "jsd"
