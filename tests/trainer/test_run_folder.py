"""`distill train` run-folder hardening (issue 14): non-causal students and online teachers, one writer per run folder
(real processes, SIGKILL leaves no stale lock), the kill window before train_config.json, --keep-last after a kill,
resume with paths spelled differently, and OS failures / bad flags as one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.common.errors import UserError
from tests.trainer.test_train import cli_args, subprocess_env
from trainer.cli import eval_command, train_command

REPO = Path(__file__).resolve().parents[2]


def one_error_line(stderr: str, pattern: str) -> str:
    import re

    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", *[str(a) for a in args]]


# --- 1. a BERT is not a student, nor an online teacher -------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_config(tmp_path_factory) -> Path:
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert-config") / "config.json"
    path.write_text(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64).to_json_string())
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_dir, bert_config) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    d = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(BertConfig.from_json_file(str(bert_config))).save_pretrained(str(d))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(d))
    return d


def test_bert_student_config_is_refused(run_train, tmp_path, bert_config):
    with pytest.raises(UserError, match=r"--student-config .*config.json: a bert model is an encoder.*not a causal"):
        run_train(out=tmp_path / "r", student_config=str(bert_config))
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "train_config.json").exists()


def test_bert_student_folder_and_online_teacher_are_refused(run_train, tmp_path, bert_dir, student_config):
    with pytest.raises(UserError, match=r"--student .*bert.*: a bert model is an encoder"):
        run_train(out=tmp_path / "a", student=str(bert_dir), student_config=None)
    with pytest.raises(UserError, match=r"--online-teacher .*bert.*: a bert model is an encoder"):
        run_train(out=tmp_path / "b", online_teacher=str(bert_dir))


# --- 2. one writer per run folder ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_second_train_is_refused_and_sigkill_leaves_no_stale_lock(tmp_path, dataset_dir, student_config):
    out = tmp_path / "run"
    # 40 steps of >= 0.5 s: the first run is still going (~19 s) while the second starts, even on a loaded machine
    args = cli_args(dataset_dir, student_config, out, steps=40, save_every=2)
    first = subprocess.Popen(train_cmd(*args, "--step-sleep", "0.5"), cwd=REPO, env=subprocess_env(),
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000002").exists():
        assert first.poll() is None, first.stderr.read()
        assert time.time() < deadline, "the first run wrote no checkpoint within 120 s"
        time.sleep(0.05)
    config_before = (out / "train_config.json").read_bytes()
    second = subprocess.run(train_cmd(*args, "--resume"), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2
    one_error_line(second.stderr, r"--out .*run is being written by another running distill process")
    assert first.poll() is None, "the first run must still be running when the second is refused"
    assert (out / "train_config.json").read_bytes() == config_before
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = subprocess.run(train_cmd(*args, "--resume"), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "run.json").exists()


# --- 3. kill windows and leftovers ---------------------------------------------------------------------------------------

def test_run_folder_killed_before_its_config_is_reused(run_train, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json.tmp-4242").write_text('{"conf')  # what a kill inside write_json_atomic leaves
    final, _ = run_train(out=out, steps=2)
    assert final["loss"] > 0
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert json.loads((out / "train_config.json").read_text())["config"]["steps"] == 2


@pytest.mark.slow
def test_sigkill_as_soon_as_the_run_folder_appears_then_resume(tmp_path, dataset_dir, student_config):
    out = tmp_path / "run"
    args = cli_args(dataset_dir, student_config, out, steps=2, save_every=1)
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no run folder within 120 s"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(train_cmd(*args, "--resume"), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "run.json").exists() and not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_keep_last_is_restored_after_a_kill_between_save_and_prune(run_train, tmp_path):
    out = tmp_path / "run"
    run_train(out=out, steps=3, save_every=1, keep_last=2)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]
    shutil.copytree(ckpts / "step-000002", ckpts / "step-000001")  # the older one a kill left before pruning
    run_train(out=out, steps=3, save_every=1, keep_last=2, resume=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]


def test_metrics_line_cut_by_a_kill_does_not_break_resume(run_train, tmp_path):
    out = tmp_path / "run"
    run_train(out=out, steps=2, save_every=1)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-append
    run_train(out=out, steps=2, save_every=1, resume=True)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --- 4. resume identity ----------------------------------------------------------------------------------------------------

def test_resume_from_another_directory_with_relative_paths(run_train, tmp_path, dataset_dir, student_config, monkeypatch):
    out = tmp_path / "run"
    run_train(out=out, steps=2, save_every=1)
    elsewhere = tmp_path / "x" / "y"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    rel = lambda p: os.path.relpath(p, elsewhere)
    final, _ = run_train(out=rel(out), data=rel(dataset_dir), student_config=rel(student_config), steps=2, save_every=1,
                         resume=True)
    assert final["loss"] > 0 and (out / "run.json").exists()


def test_resume_with_another_spelling_of_the_same_student_then_a_changed_one(run_train, tmp_path, student_config,
                                                                            monkeypatch):
    out = tmp_path / "run"
    run_train(out=out, steps=2, save_every=1)
    monkeypatch.chdir(student_config.parent)
    run_train(out=out, steps=2, save_every=1, resume=True, student_config="./config.json")  # same file, other spelling
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(json.loads(student_config.read_text()) | {"rms_norm_eps": 1e-3}))
    with pytest.raises(UserError, match=r"--resume with changed settings \(--student-config"):
        run_train(out=out, steps=2, save_every=1, resume=True, student_config=str(changed))


# --- 5. one clean line ---------------------------------------------------------------------------------------------------

def test_out_that_is_a_file_and_data_that_is_a_file(tmp_path, dataset_dir, student_config):
    f = tmp_path / "file"
    f.write_text("keep")
    r = CliRunner().invoke(train_command, cli_args(dataset_dir, student_config, f, steps=1))
    assert r.exit_code == 2 and f.read_text() == "keep"
    one_error_line(r.stderr, r"--out .*file is a file, expected a folder")
    r = CliRunner().invoke(train_command, cli_args(f, student_config, tmp_path / "o", steps=1))
    assert r.exit_code == 2
    one_error_line(r.stderr, r"file")


def test_eval_batch_size_zero(tmp_path, dataset_dir):
    r = CliRunner().invoke(eval_command, ["--student", str(tmp_path), "--data", str(dataset_dir), "--batch-size", "0"])
    assert r.exit_code == 2
    one_error_line(r.stderr, r"--batch-size is 0; expected a positive integer")


def test_missing_local_student_folder(tmp_path, dataset_dir):
    missing = tmp_path / "no" / "such" / "student"
    r = CliRunner().invoke(train_command, ["--data", str(dataset_dir), "--out", str(tmp_path / "o"), "--steps", "1",
                                           "--device", "cpu", "--student", str(missing)])
    assert r.exit_code == 2
    line = one_error_line(r.stderr, r"--student .*student: no such folder")
    assert "repo" not in line.lower()
    r = CliRunner().invoke(eval_command, ["--student", str(missing), "--data", str(dataset_dir)])
    one_error_line(r.stderr, r"--student .*student: no such folder")


def test_disk_full_while_training_is_one_line_mentioning_the_disk(tmp_path, dataset_dir, student_config):
    import resource

    limit = 100 * 1024  # below the size of one checkpoint's weights

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "run"
    r = subprocess.run(train_cmd(*cli_args(dataset_dir, student_config, out, steps=2, save_every=1)), cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r.stderr, r"disk")


def test_read_only_out_folder(tmp_path, dataset_dir, student_config):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only filesystem instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only filesystem")
    else:
        ro.chmod(0o555)
    try:
        r = CliRunner().invoke(train_command, cli_args(dataset_dir, student_config, ro / "run", steps=1))
        assert r.exit_code == 2
        one_error_line(r.stderr, r"--out .*run: cannot write.*read-only|permission denied")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        ro.chmod(0o755)


def test_damaged_train_config_is_one_line(run_train, tmp_path):
    out = tmp_path / "run"
    run_train(out=out, steps=1)
    (out / "train_config.json").write_text('{"config": ')
    with pytest.raises(UserError, match=r"train_config.json is not a JSON object \(damaged\)"):
        run_train(out=out, steps=1, resume=True)
