"""What `distill train` prints outside a terminal (plain periodic lines, no carriage returns), --quiet, --report-to,
--threads, and a --warmup longer than the run."""

from __future__ import annotations

import io
import json
import re

import pytest
from click.testing import CliRunner

from pipeline.common.errors import UserError
from trainer.cli import train_command
from trainer.progress import Progress, progress_line

LINE = re.compile(r"^step (\d+)/(\d+) \(\d+%\)  loss \d+\.\d{4}  lr \S+  tokens/s \d+  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$")


def train_args(dataset_dir, student_config, out, *extra):
    return [str(a) for a in ("--data", dataset_dir, "--student-config", student_config, "--out", out, "--steps", 4,
                             "--warmup", 1, "--batch-size", 4, "--device", "cpu", *extra)]


def step_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("step ")]


def test_batch_job_prints_plain_lines_first_and_last(tmp_path, dataset_dir, student_config):
    r = CliRunner().invoke(train_command, train_args(dataset_dir, student_config, tmp_path / "run"))  # not a TTY
    assert r.exit_code == 0, r.output
    assert "\r" not in r.stderr
    lines = step_lines(r.stderr)
    assert [int(LINE.match(x).group(1)) for x in lines] == [1, 4]  # default --log-seconds 30: first and last only
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f"loss {metrics[-1]['loss']:.4f}" in lines[-1]


def test_no_progress_still_prints_lines_and_quiet_prints_none(tmp_path, dataset_dir, student_config):
    r = CliRunner().invoke(train_command, train_args(dataset_dir, student_config, tmp_path / "a", "--no-progress",
                                                     "--log-seconds", 0, "--log-every", 2))
    assert r.exit_code == 0, r.output
    assert [int(LINE.match(x).group(1)) for x in step_lines(r.stderr)] == [2, 4]
    r = CliRunner().invoke(train_command, train_args(dataset_dir, student_config, tmp_path / "b", "--quiet"))
    assert r.exit_code == 0, r.output
    assert step_lines(r.stderr) == [] and "saved student to" in r.stderr


def test_terminal_gets_a_bar_and_lines_have_an_eta():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = Progress(3, 0, enabled=True, bar=None, log_seconds=0, stream=tty)
    for step in (1, 2, 3):
        p.update(step, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0})
    p.close()
    assert "\r" in tty.getvalue() and not step_lines(tty.getvalue())
    line = progress_line(5, 20, {"loss": 2.5, "lr": 3e-4, "tokens_per_s": 5870.4}, elapsed=50.0, done=5)
    assert line == "step 5/20 (25%)  loss 2.5000  lr 3.00e-04  tokens/s 5870  elapsed 0:00:50  eta 0:02:30"


def test_report_to_a_missing_package_is_one_line(tmp_path, dataset_dir, student_config):
    r = CliRunner().invoke(train_command, train_args(dataset_dir, student_config, tmp_path / "run", "--report-to", "mlflow"))
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: --report-to mlflow needs the mlflow package, which is not installed; pip install "
                                "mlflow, or drop --report-to")
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(train_command, train_args(dataset_dir, student_config, tmp_path / "r2", "--report-to", "comet"))
    assert r.exit_code == 2 and "expected one of none, tensorboard, mlflow, wandb" in r.stderr


def test_threads_sets_torch_and_zero_is_refused(run_train):
    import torch

    run_train(steps=1, threads=2)
    assert torch.get_num_threads() == 2
    run_train(out=None, steps=1, resume=True)  # default: 1
    assert torch.get_num_threads() == 1
    with pytest.raises(UserError, match=r"--threads is 0; expected a positive integer"):
        run_train(steps=1, threads=0)


def test_warmup_longer_than_the_run_is_scaled_and_said(tmp_path, run_train, capsys):
    from trainer.train import lr_schedule

    _, out = run_train(steps=20, warmup=100, log_every=1)
    err = capsys.readouterr().err
    assert ("note: --warmup 100 is longer than the run (20 steps) and would never reach the peak --lr; warming up over "
            "2 steps (10% of the run) instead; pass --warmup 20 or less to choose") in err
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:3] == pytest.approx([3e-3 * 0.5, 3e-3, 3e-3 * lr_schedule("cosine", 2, 20)(2)])
    assert max(lrs) == pytest.approx(3e-3)
    assert lr_schedule("cosine", 20, 20)(19) == 1.0  # a warmup as long as the run is kept (it reaches the peak)


def test_report_to_tensorboard_writes_the_metrics(run_train, dataset_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    final, out = run_train(steps=3, report_to="tensorboard", eval_data=str(dataset_dir), eval_batches=1)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3] and loss[-1].value == pytest.approx(final["loss"], rel=1e-6)
    assert events.Scalars("eval/ce")[-1].value == pytest.approx(final["eval"]["ce"], rel=1e-6)
