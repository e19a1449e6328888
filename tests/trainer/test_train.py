"""Stage two end to end on a dataset made by the real precompute: training, refusals, exact resume, baselines, DDP."""

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
import torch
from safetensors.torch import load_file

from pipeline.common.errors import FormatError, UserError
from pipeline.format import open_dataset
from pipeline.format.tokenizer_id import tokenizer_sha256

from .conftest import WINDOWS, student_config_dict

REPO = Path(__file__).resolve().parents[2]


def train_lines(out: Path) -> list[dict]:
    return [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The student's weights in a checkpoint folder, or in a run folder's model/."""
    return load_file(str(folder / "model" / "model.safetensors" if (folder / "model").is_dir() else folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, exact: bool = True):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_end_to_end_loss_decreases_and_student_loads(run_train, dataset_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, out = run_train(steps=30, lr=1e-2, warmup=3, save_every=10, keep_last=2, eval_data=str(dataset_dir),
                           eval_every=15)
    lines = train_lines(out)
    evals = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" in x]
    assert [x["step"] for x in evals] == [15, 30] and evals[1]["eval"]["ce"] < evals[0]["eval"]["ce"]
    assert [x["step"] for x in lines] == list(range(1, 31))
    first, last = sum(x["loss"] for x in lines[:5]) / 5, sum(x["loss"] for x in lines[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert all(k in lines[0] for k in ("ce", "kd", "hidden", "lr", "grad_norm", "tokens_per_s"))
    assert final["step"] == 30 and set(final["eval"]) >= {"ce", "perplexity", "kl", "top1_agreement", "ece"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000020", "step-000030"]

    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    ds = open_dataset(dataset_dir)
    assert tokenizer_sha256(tok) == ds.manifest.tokenizer.sha256
    ids = torch.tensor([tok("def f(x):\n    return x")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
    run = json.loads((out / "run.json").read_text())
    assert run["dataset"]["manifest_sha256"] == ds.manifest_sha256
    assert run["config"]["steps"] == 30 and run["final_metrics"]["eval"] == final["eval"]


def test_fused_loss_trains_like_the_plain_one(run_train, tmp_path):
    fused, a = run_train(out=tmp_path / "fused", steps=3)
    plain, b = run_train(out=tmp_path / "plain", steps=3, loss_impl="plain")
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert_same_weights(a, b, exact=False)


def test_workers_and_accumulation_do_not_change_the_result(run_train, tmp_path):
    _, a = run_train(out=tmp_path / "w0", steps=3, batch_size=2, grad_accum=2)
    _, b = run_train(out=tmp_path / "w2", steps=3, batch_size=2, grad_accum=2, workers=2)
    assert_same_weights(a, b)


def test_baselines_see_the_same_data_order(run_train, tmp_path, teacher_dir):
    offline, _ = run_train(out=tmp_path / "kd", steps=3, record_windows=True)
    ce_only, _ = run_train(out=tmp_path / "ce", steps=3, record_windows=True, ce_only=True)
    online, _ = run_train(out=tmp_path / "online", steps=3, record_windows=True, online_teacher=str(teacher_dir))
    assert offline["windows"] == ce_only["windows"] == online["windows"]
    assert ce_only["kd"] == 0 and ce_only["loss"] == pytest.approx(ce_only["ce"])
    assert online["kd"] > 0 and offline["kd"] > 0


def test_hidden_state_loss_and_projections(run_train):
    from trainer.checkpoint import latest_checkpoint, load_state

    final, out = run_train(steps=2, hidden_weight=1.0, hidden_map="1:1,2:2", hidden_loss="cosine")
    assert final["hidden"] > 0
    state = load_state(latest_checkpoint(out))
    assert set(state["projections"]) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    assert state["projections"]["1.weight"].shape == (48, 32)  # teacher width 48, student width 32


def test_bfloat16_autocast_with_gradient_checkpointing(run_train):
    final, _ = run_train(steps=2, dtype="bfloat16", gradient_checkpointing=True)
    assert torch.isfinite(torch.tensor(final["loss"]))


def test_trains_from_an_fsspec_url(run_train, dataset_dir):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(dataset_dir), "/train-url-test", recursive=True)
    try:
        final, out = run_train(data="memory:///train-url-test", steps=2)
    finally:
        fs.rm("/train-url-test", recursive=True)
    assert final["step"] == 2 and (out / "model" / "tokenizer.json").exists()  # the tokenizer came from the URL too


def test_sampled_targets_in_the_compact_encoding(run_train, tmp_path, teacher_dir, corpus_dir):
    from pipeline.config import PrecomputeConfig
    from pipeline.precompute import precompute

    data = tmp_path / "sampled"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(data), seq_len=16, top_k=4,
                                targets="both", samples=8, encoding="compact", batch_size=8, shard_size=8,
                                max_tokens=16 * 16, progress=False))
    assert open_dataset(data).target_kinds == ["topk", "sampled"]
    sampled, _ = run_train(data=str(data), targets="sampled", steps=2, eval_data=str(data))
    topk, _ = run_train(out=tmp_path / "topk", data=str(data), steps=2)  # auto: the first stored kind
    assert sampled["kd"] > 0 and topk["kd"] > 0 and sampled["kd"] != topk["kd"]
    assert sampled["eval"]["kl"] >= 0


def test_pretrained_student_folder(run_train, student_dir):
    final, out = run_train(steps=2, student=str(student_dir), student_config=None)
    assert (out / "model" / "tokenizer.json").exists() and final["step"] == 2


def test_tied_gpt2_student_resumes_from_an_older_checkpoint(run_train, tmp_path):
    """Not Llama-specific; tied embeddings survive a checkpoint round trip. The end of a finished run is cut off by
    hand (newest checkpoint, final files), and --resume must redo it bit for bit."""
    from transformers import GPT2Config

    config = tmp_path / "gpt2.json"
    config.write_text(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2, n_positions=64).to_json_string())
    final, out = run_train(student_config=str(config), steps=4, save_every=2, keep_last=5)
    expected = weights(out)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "run.json").unlink()
    shutil.rmtree(out / "model")
    resumed, _ = run_train(out=out, student_config=str(config), steps=4, save_every=2, keep_last=5, resume=True)
    assert all(torch.equal(expected[k], v) for k, v in weights(out).items())
    assert resumed["loss"] == final["loss"]


# --- refusals: each before any step, with a message naming the fix ------------------------------------------------


def altered_tokenizer_student(tmp_path, student_dir, fake=None):
    copy = tmp_path / "student-other-tokenizer"
    shutil.copytree(student_dir, copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different ids
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    return {"student": str(copy), "student_config": None}


def config_file(tmp_path, **overrides):
    path = tmp_path / "student.json"
    path.write_text(json.dumps(student_config_dict(**overrides)))
    return {"student_config": str(path)}


def newer_format(tmp_path, fake):
    path = fake([4])
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    return {"data": str(path)}


REFUSALS = {
    "vocab": (lambda tp, sd, fake: config_file(tp, vocab=300), UserError, "vocab size 300 differs from the teacher's 320"),
    "tokenizer": (altered_tokenizer_student, UserError, "tokenizer differs from the teacher's tokenizer"),
    "positions": (lambda tp, sd, fake: config_file(tp, max_position_embeddings=8), UserError,
                  "windows are 16 tokens but the student handles at most 8 positions"),
    "no hidden states": (lambda tp, sd, fake: {"data": str(fake([4])), "hidden_weight": 1.0, **config_file(tp, vocab=50)},
                         UserError, "needs hidden states but the dataset has none"),
    "missing layer": (lambda tp, sd, fake: {"hidden_weight": 1.0, "hidden_map": "1:1,2:3"}, UserError,
                      "teacher layer 3, which the dataset does not store"),
    "format version": (lambda tp, sd, fake: newer_format(tp, fake), FormatError, "newer than this distill understands"),
    "target kind": (lambda tp, sd, fake: {"targets": "sampled"}, UserError,
                    "--targets sampled: the dataset stores topk targets"),
    "no targets": (lambda tp, sd, fake: {"data": str(fake([4], top_k=0)), **config_file(tp, vocab=50)}, UserError,
                   "stores no teacher distribution"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, run_train, tmp_path, student_dir, fake_dataset):
    make, error, message = REFUSALS[case]
    out = tmp_path / "refused"
    with pytest.raises(error, match=message):
        run_train(out=out, **make(tmp_path, student_dir, fake_dataset))
    assert not (out / "metrics.jsonl").exists() and not (out / "train_config.json").exists()


def test_corrupt_shard_stops_training_naming_it(run_train, tmp_path, dataset_dir):
    copy = tmp_path / "ds"
    shutil.copytree(dataset_dir, copy)
    for arrow in (copy / "shards").glob("*.arrow"):
        data = bytearray(arrow.read_bytes())
        data[len(data) // 2] ^= 0xFF
        arrow.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"shard 0000\d: checksum mismatch in 0000\d.arrow"):
        run_train(data=str(copy), workers=1)


def test_out_holding_a_run_needs_resume_with_the_same_settings(run_train, tmp_path):
    _, out = run_train(steps=2)
    with pytest.raises(UserError, match="holds another run; pass --resume"):
        run_train(out=out, steps=2)
    with pytest.raises(UserError, match=r"changed settings \(--lr: 0.003 -> 0.001\)"):
        run_train(out=out, steps=2, lr=1e-3, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no distill run"):
        run_train(out=tmp_path / "other")
    final, _ = run_train(out=out, steps=2, resume=True)  # already finished: nothing left to do
    assert final["step"] == 2


# --- exact resume after SIGKILL, DDP coverage: real subprocesses ---------------------------------------------------


def cli_args(dataset_dir, student_config, out, **kw) -> list[str]:
    values = dict(data=dataset_dir, out=out, student_config=student_config, batch_size=4, lr=3e-3, warmup=2,
                  device="cpu") | kw
    args = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return args + ["--no-progress"]


def subprocess_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_weights(run_train, tmp_path, dataset_dir, student_config):
    steps = 12
    _, straight = run_train(out=tmp_path / "straight", steps=steps, save_every=3)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer.cli", "train"] + cli_args(dataset_dir, student_config, out, steps=steps, save_every=3)
    proc = subprocess.Popen(cmd + ["--step-sleep", "0.4"], cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000003").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        if time.time() > deadline:
            pytest.fail("the training subprocess wrote no checkpoint within 120 s")
        time.sleep(0.05)
    time.sleep(0.5)  # into the next steps, possibly mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").exists()  # it really died before the end
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert 3 <= saved[-1] < steps
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_weights(straight, out)
    assert [x["step"] for x in train_lines(out)] == list(range(1, steps + 1))  # lines past the checkpoint rewritten once


@pytest.mark.slow
def test_ddp_two_ranks_cover_the_single_process_epoch(run_train, tmp_path, dataset_dir, student_config):
    single, _ = run_train(out=tmp_path / "single", epochs=1, steps=None, record_windows=True, log_every=100)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer.cli",
           "train"] + cli_args(dataset_dir, student_config, out, epochs=1, record_windows=True)
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = train_lines(out)
    assert len(lines) == WINDOWS // 2 // 4  # 24 windows per rank in batches of 4: 6 steps on each rank
    per_rank = [sum((x["windows"][r] for x in lines), []) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == WINDOWS // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(single["windows"][0]) == list(range(WINDOWS))
    assert (out / "model" / "model.safetensors").exists() and json.loads((out / "run.json").read_text())["world_size"] == 2


# --- learning-rate schedules and runs extended with a larger --steps (issue 9) -------------------------------------


def test_schedules_values():
    from trainer.train import lr_schedule, stable_end

    cos = lr_schedule("cosine", 2, 10)
    assert [cos(0), cos(1), cos(2)] == [0.5, 1.0, 1.0] and 0 < cos(9) < 0.05
    const = lr_schedule("constant", 2, 10)
    assert [const(i) for i in range(12)] == [0.5] + [1.0] * 11
    wsd = lr_schedule("wsd", 2, 10)  # default decay: 20% of 10 = 2 steps, from step 8
    assert stable_end("wsd", 2, 10, None) == 8 and stable_end("cosine", 2, 10, None) is None
    assert [wsd(i) for i in range(10)] == [0.5] + [1.0] * 7 + [2 / 3, 1 / 3]
    wsd4 = lr_schedule("wsd", 0, 10, decay_steps=4)
    assert [wsd4(i) for i in range(5, 10)] == [1.0, 0.8, 0.6, 0.4, 0.2]
    # before its decay, a longer wsd run has exactly the values of a shorter one: what makes extensions exact
    assert [lr_schedule("wsd", 2, 100)(i) for i in range(8)] == [wsd(i) for i in range(8)]


@pytest.mark.parametrize("schedule", ["constant", "wsd"])
def test_extending_a_finished_run_equals_a_run_started_with_the_larger_total(schedule, run_train, tmp_path):
    # save_every is large: the short run keeps only its final checkpoint (and, for wsd, the copy of its stable phase)
    _, short = run_train(out=tmp_path / "short", steps=5, schedule=schedule, log_every=1)
    names = sorted(p.name for p in (short / "checkpoints").iterdir())
    assert names == (["stable-000004", "step-000004", "step-000005"] if schedule == "wsd" else ["step-000005"])
    _, extended = run_train(out=short, steps=10, schedule=schedule, log_every=1, resume=True)
    _, whole = run_train(out=tmp_path / "whole", steps=10, schedule=schedule, log_every=1)

    assert_same_weights(extended, whole)
    assert [(x["step"], x["lr"], x["loss"]) for x in train_lines(extended)] == \
        [(x["step"], x["lr"], x["loss"]) for x in train_lines(whole)]
    assert json.loads((extended / "train_config.json").read_text())["config"]["steps"] == 10
    if schedule == "wsd":  # the decayed step 5 of the short run is gone; the new total's stable phase ends at 8
        assert sorted(p.name for p in (extended / "checkpoints").iterdir()) == [
            "stable-000008", "step-000004", "step-000008", "step-000010"]
    # extended again, from the new total's kept checkpoint
    _, again = run_train(out=extended, steps=12, schedule=schedule, resume=True)
    _, whole12 = run_train(out=tmp_path / "whole12", steps=12, schedule=schedule)
    assert_same_weights(again, whole12)


def test_wsd_extension_without_a_checkpoint_before_the_decay_is_refused(run_train, tmp_path):
    _, out = run_train(steps=5, schedule="wsd")
    shutil.rmtree(out / "checkpoints" / "stable-000004")
    shutil.rmtree(out / "checkpoints" / "step-000004")
    with pytest.raises(UserError, match=r"--steps 10: no checkpoint .* before step 4, where the wsd schedules of 5 and "
                                        r"10 steps part; choose a new --out"):
        run_train(out=out, steps=10, schedule="wsd", resume=True)
    assert (out / "checkpoints" / "step-000005").is_dir()  # nothing deleted by the refusal


def test_cosine_run_cannot_be_extended_and_the_refusal_names_the_fix(run_train, tmp_path):
    _, out = run_train(steps=2)
    with pytest.raises(UserError, match=r"--steps: 2 -> 4 \(the cosine schedule depends on the total.*start them with "
                                        r"--schedule constant or --schedule wsd\)"):
        run_train(out=out, steps=4, resume=True)
    with pytest.raises(UserError, match=r"--schedule: 'cosine' -> 'constant'"):
        run_train(out=out, steps=4, schedule="constant", resume=True)
    with pytest.raises(UserError, match="--decay-steps is for --schedule wsd"):
        run_train(out=tmp_path / "x", steps=4, decay_steps=2)
