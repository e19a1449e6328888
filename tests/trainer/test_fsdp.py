"""`distill train --fsdp` (trainer/fsdp.py): two real torchrun ranks (gloo, CPU) train like one process on the same data,
a SIGKILLed sharded run resumes to the same weights, and without torchrun --fsdp runs 1-way."""

from __future__ import annotations

import importlib.util

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.common.errors import UserError

from .test_train import REPO, assert_same_weights, cli_args, subprocess_env, train_lines

# 48 windows: 2 ranks x 3 micro-batches of 8 = one optimizer step per epoch; one process takes 6 micro-batches of 8 for
# the same step. Every window has the same number of predicted positions, so the mean of micro-batch means is the
# same number either way, and FSDP averages the ranks' gradients like one process averages its micro-batches.
STEPS, SAVE_EVERY = 4, 1
SAME_MATH = dict(batch_size=8, steps=STEPS, hidden_weight=0.5, warmup=1)  # projections sharded and checkpointed too


def torchrun(out: Path, dataset_dir, student_config, *extra: str, log: Path | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer.cli",
           "train", *cli_args(dataset_dir, student_config, out, fsdp=True, grad_accum=3, save_every=SAVE_EVERY,
                              gradient_checkpointing=True, eval_data=dataset_dir, eval_every=2, **SAME_MATH), *extra]
    if log:  # started, not waited for; stderr to a file (a pipe nobody reads could fill and block the ranks)
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _bench_fsdp():
    """scripts/bench_fsdp.py, whose `ranks(pid)` lists torchrun's rank processes (each in a session of its own, so a
    process-group kill would miss them)."""
    spec = importlib.util.spec_from_file_location("bench_fsdp", Path(__file__).resolve().parents[2] / "scripts" / "bench_fsdp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workers = _bench_fsdp().ranks


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its ranks at once, and wait until the ranks are gone."""
    ranks = workers(proc.pid)
    for pid in [proc.pid] + ranks:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
              for pid in ranks):
        if time.time() > deadline:  # a guard against a hang, not a speed target
            pytest.fail("a killed rank is still running 30 s after SIGKILL")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, dataset_dir, student_config) -> Path:
    """An uninterrupted 2-rank --fsdp run (with activation checkpointing)."""
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    done = torchrun(out, dataset_dir, student_config)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_fsdp_ranks_train_like_one_process(fsdp_run, run_train, tmp_path, dataset_dir):
    single, single_out = run_train(out=tmp_path / "single", grad_accum=6, eval_data=str(dataset_dir), **SAME_MATH)
    assert_same_weights(fsdp_run, single_out, exact=False)  # rtol 1e-4, atol 1e-5: only the summation order differs
    fsdp_eval = [x["eval"] for x in map(json.loads, (fsdp_run / "metrics.jsonl").read_text().splitlines()) if "eval" in x]
    assert [x["tokens"] for x in fsdp_eval] == [single["eval"]["tokens"]] * 2  # at step 2 and at the end, all windows
    assert fsdp_eval[-1]["ce"] == pytest.approx(single["eval"]["ce"], rel=1e-5)  # each rank evaluates the gathered student
    for a, b in zip(train_lines(fsdp_run), train_lines(single_out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    ckpt = fsdp_run / "checkpoints" / f"step-{STEPS:06d}"
    layout = json.loads((ckpt / "fsdp.json").read_text())
    assert layout["world_size"] == 2
    assert any(n.startswith("projections.") for n in layout["param_names"])
    from safetensors.torch import load_file

    parts = [load_file(str(ckpt / "shards" / f"rank-{r:05d}-of-00002.safetensors")) for r in range(2)]
    name = "weights.model.model.layers.0.mlp.up_proj.weight"  # (64, 32): 32 rows on each rank
    assert parts[0][name].shape == parts[1][name].shape == (32, 32)
    assert not (ckpt / "model.safetensors").exists()  # sharded, never gathered into one file
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(fsdp_run / "model").config.hidden_size == 32  # OUT/model/ is ordinary


@pytest.mark.slow
def test_fsdp_sigkill_and_resume_gives_the_uninterrupted_weights(fsdp_run, tmp_path, dataset_dir, student_config):
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = torchrun(out, dataset_dir, student_config, "--step-sleep", "0.5", log=log)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000001").exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        if time.time() > deadline:
            kill_all(proc)
            pytest.fail("the torchrun run wrote no checkpoint within 120 s")
        time.sleep(0.05)
    time.sleep(0.6)  # into the next step, possibly mid-save
    assert len(workers(proc.pid)) == 2
    kill_all(proc)
    assert not (out / "run.json").exists()  # it really died before the end
    from trainer.checkpoint import list_checkpoints

    saved = [step for step, _ in list_checkpoints(out)]  # complete ones (a kill mid-save leaves a .tmp- folder too)
    assert 1 <= saved[-1] < STEPS
    done = torchrun(out, dataset_dir, student_config, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(fsdp_run, out)  # bit for bit
    assert [x["step"] for x in train_lines(out)] == list(range(1, STEPS + 1))


def test_fsdp_without_torchrun_runs_one_way_like_the_plain_path(run_train, tmp_path, dataset_dir):
    kw = dict(steps=3, hidden_weight=0.5, eval_data=str(dataset_dir), eval_every=2, eval_batches=2, save_every=2)
    sharded, out = run_train(out=tmp_path / "fsdp", fsdp=True, **kw)
    plain, plain_out = run_train(out=tmp_path / "plain", **kw)
    assert not torch.distributed.is_initialized()  # the group of one is closed at the end
    assert_same_weights(out, plain_out, exact=False)
    assert sharded["eval"]["ce"] == pytest.approx(plain["eval"]["ce"], rel=1e-5)  # evaluation sees the gathered student
    assert (out / "checkpoints" / "step-000002" / "shards" / "rank-00000-of-00001.safetensors").is_file()
    with pytest.raises(UserError, match="--fsdp: True -> False"):  # a sharded run is resumed by --fsdp only
        run_train(out=out, resume=True, **kw)
    leftover = out / "checkpoints" / "step-000004.tmp-sharded" / "shards"  # what a kill mid-save leaves
    leftover.mkdir(parents=True)
    (leftover / "rank-00000-of-00001.safetensors").write_bytes(b"cut short")
    again, _ = run_train(out=out, resume=True, fsdp=True, **kw)  # finished: no step, the final evaluation again
    assert not leftover.parent.exists()
    assert again["eval"] == sharded["eval"]
    assert_same_weights(out, plain_out, exact=False)


def test_fsdp_bfloat16_tied_student_keeps_float32_master_weights(run_train, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .conftest import student_config_dict

    config = tmp_path / "tied.json"
    config.write_text(json.dumps(student_config_dict(tie_word_embeddings=True)))
    kw = dict(student_config=str(config), steps=2, save_every=2)
    bf16, out = run_train(out=tmp_path / "bf16", fsdp=True, dtype="bfloat16", **kw)
    f32, _ = run_train(out=tmp_path / "f32", fsdp=True, dtype="float32", **kw)
    assert bf16["loss"] != f32["loss"] and bf16["loss"] == pytest.approx(f32["loss"], rel=2e-2)  # computed in bfloat16
    shards = load_file(str(out / "checkpoints" / "step-000002" / "shards" / "rank-00000-of-00001.safetensors"))
    assert {v.dtype for k, v in shards.items() if not k.endswith(".step")} == {torch.float32}  # master weights, Adam
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still one tied matrix
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert torch.equal(saved["model.embed_tokens.weight"], shards["weights.model.model.embed_tokens.weight"])
