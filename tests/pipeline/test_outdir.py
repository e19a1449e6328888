"""`distill precompute` output-folder hardening (issues 9 and 14): non-causal teachers, one writer per folder (real
processes), the kill window before settings.json, leftovers of killed runs, resume across path spellings, symlinks,
and OS failures (disk full, read-only folder, a file as --out) as one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.common.cli import main
from tests.pipeline.test_cli import assert_user_error, base, invoke

REPO = Path(__file__).resolve().parents[2]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_DATASETS_OFFLINE="1")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *[str(a) for a in args]]


def one_error_line(stderr: str, pattern: str) -> str:
    import re

    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. a BERT is not a teacher --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny real BERT (encoder) saved with weights and the test tokenizer: AutoModelForCausalLM loads it."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    d = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(str(d))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(d))
    return d


def test_bert_teacher_is_refused_naming_it(tmp_path, bert_dir, corpus_dir):
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(bert_dir)) is not None  # loading alone would accept it
    r = invoke(*base(bert_dir, corpus_dir, tmp_path / "o"))
    assert_user_error(r, r"--teacher .*bert.*: a bert model is an encoder.*not a causal language model")
    assert not (tmp_path / "o").exists()  # refused before writing anything, no empty folder left


def test_bert_with_is_decoder_is_accepted(tmp_path, bert_dir):
    from pipeline.common.causal import causal_lm_problem
    from transformers import BertConfig, LlamaConfig, T5Config

    assert causal_lm_problem(BertConfig(is_decoder=True)) is None
    assert causal_lm_problem(LlamaConfig()) is None
    assert "encoder-decoder" in causal_lm_problem(T5Config())
    assert "encoder" in causal_lm_problem(BertConfig())


# --- 2. one writer per --out (real processes) ------------------------------------------------------------------------

def long_capture(teacher, data, out, *extra):
    return cli("precompute", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", 32, "--top-k", 8,
               "--batch-size", 2, "--shard-size", 2, "--max-tokens", 30000, "--no-progress", "--device", "cpu", *extra)


@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_writer_leaves_no_stale_lock(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    first = subprocess.Popen(long_capture(teacher_dir, corpus_dir, out), env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "_progress").glob("shard-*.json")):
        assert first.poll() is None, first.stderr.read()
        assert time.time() < deadline, "the first capture wrote no shard within 120 s"
        time.sleep(0.05)
    # the shards finished by now (a progress marker each); the first run goes on writing others meanwhile
    done = {p.stem.removeprefix("shard-") for p in (out / "_progress").glob("shard-*.json")}
    before = {k: v for k, v in tree(out / "shards").items() if k.split(".", 1)[0].split("/", 1)[0] in done}
    assert before
    second = subprocess.run(long_capture(teacher_dir, corpus_dir, out), env=env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    one_error_line(second.stderr, r"--out .*out is being written by another running distill process.*--rank and --world-size")
    assert first.poll() is None, "the first capture must still be running when the second is refused"
    assert all(tree(out / "shards").get(k) == v for k, v in before.items())  # the refused run touched no shard
    first.send_signal(signal.SIGKILL)
    first.wait()
    # the kernel dropped the killed process's lock: a rerun takes the folder and finishes the capture
    third = subprocess.run(long_capture(teacher_dir, corpus_dir, out, "--max-tokens", 400), env=env(),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 2 and "max_tokens" in third.stderr  # other settings: refused as before, not "in use"
    third = subprocess.run(long_capture(teacher_dir, corpus_dir, out), env=env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    assert (out / "manifest.json").exists() and not (out / "_progress").exists()


def test_ranks_share_the_lock_but_a_run_without_rank_excludes_them(tmp_path):
    from pipeline.common.errors import UserError
    from pipeline.common.outdir import lock_folder, unlock_folder

    out = tmp_path / "o"
    out.mkdir()
    code = ("import sys, time; from pathlib import Path; from pipeline.common.outdir import lock_folder; "
            "lock_folder(Path(sys.argv[1]), shared=sys.argv[2] == 'shared'); print('locked', flush=True); time.sleep(60)")
    for mode, others_ok in (("shared", True), ("exclusive", False)):
        holder = subprocess.Popen([sys.executable, "-c", code, str(out), mode], env=env(), stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            if others_ok:
                unlock_folder(lock_folder(out, shared=True))  # another rank of the same capture joins
            else:
                with pytest.raises(UserError, match="being written by another running distill process"):
                    lock_folder(out, shared=True)
            with pytest.raises(UserError, match="being written by another running distill process"):
                lock_folder(out)  # a run without --rank is refused either way
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    unlock_folder(lock_folder(out))  # nothing stale after SIGKILL


# --- 3. kill windows and leftovers -------------------------------------------------------------------------------------

def test_folder_killed_before_settings_json_is_reused(tmp_path, teacher_dir, corpus_dir):
    """What a SIGKILL between creating _progress/ and renaming settings.json leaves (issue 9 R1)."""
    out = tmp_path / "out"
    (out / "_progress").mkdir(parents=True)
    (out / "_progress" / "settings.json.tmp-4242").write_text('{"format_ver')
    (out / "shards").mkdir()
    r = invoke(*base(teacher_dir, corpus_dir, out))
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").exists() and not (out / "_progress").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_sigkill_as_soon_as_progress_appears_then_rerun(tmp_path, teacher_dir, corpus_dir):
    """A real process killed at the first sight of _progress/ (in or just after the settings.json window)."""
    out = tmp_path / "out"
    args = base(teacher_dir, corpus_dir, out, "--device", "cpu")
    proc = subprocess.Popen(cli(*args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "_progress").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no _progress/ within 120 s"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cli(*args), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists() and not (out / "_progress").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_a_foreign_file_still_makes_the_folder_refused(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    (out / "_progress").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert_user_error(invoke(*base(teacher_dir, corpus_dir, out)), r"is not empty and holds no distill dataset")
    assert (out / "notes.txt").read_text() == "mine"


def test_leftovers_in_a_finished_dataset_are_removed_on_rerun(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    assert invoke(*base(teacher_dir, corpus_dir, out)).exit_code == 0
    kept = tree(out)
    (out / "manifest.json.tmp-777").write_text("{")
    (out / "tokenizer.tmp-777").mkdir()
    (out / "tokenizer.tmp-777" / "tokenizer.json").write_text("{}")
    (out / "_progress").mkdir()
    (out / "_progress" / "shard-00000.json").write_text("{}")
    (out / "shards" / "00000.arrow.tmp-777").write_bytes(b"x")
    r = CliRunner().invoke(main, [str(a) for a in base(teacher_dir, corpus_dir, out)])
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    assert tree(out) == kept  # exactly the finished dataset: leftovers gone, nothing else touched
    assert invoke("verify", out).exit_code == 0


# --- 4. resume identity: the same paths spelled differently ----------------------------------------------------------

def test_rerun_with_relative_paths_from_another_directory_is_the_same_capture(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    assert invoke(*base(teacher_dir, corpus_dir, out)).exit_code == 0
    # interrupt it: keep the shards and markers of a capture that has not written its manifest yet
    m = json.loads((out / "manifest.json").read_text())
    (out / "_progress").mkdir()
    (out / "_progress" / "settings.json").write_text(json.dumps(m["settings"]))
    (out / "manifest.json").unlink()
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    rel = lambda p: os.path.relpath(p, elsewhere)
    args = [str(a) for a in base(rel(teacher_dir), rel(corpus_dir), rel(out))]
    r = subprocess.run(cli(*args), cwd=elsewhere, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["settings"]["corpus_fingerprint"] == m["settings"]["corpus_fingerprint"]
    # a different teacher is still refused, by content
    other = tmp_path / "other-teacher"
    import shutil

    shutil.copytree(teacher_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    assert_user_error(invoke(*base(other, corpus_dir, out)), r"other settings \(.*teacher_")


# --- 5. one clean line ---------------------------------------------------------------------------------------------------

def test_out_that_is_a_file(tmp_path, teacher_dir, corpus_dir):
    f = tmp_path / "file"
    f.write_text("keep")
    assert_user_error(invoke(*base(teacher_dir, corpus_dir, f)), r"--out .*file is a file, expected a folder")
    assert f.read_text() == "keep"


def test_zero_byte_jsonl(tmp_path, teacher_dir):
    data = tmp_path / "empty.jsonl"
    data.write_bytes(b"")
    r = subprocess.run(cli(*base(teacher_dir, data, tmp_path / "o")), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    one_error_line(r.stderr, r"corpus is empty")


def test_describe_never_raises():
    from pipeline.common.errors import describe

    class Broken(Exception):
        def __str__(self):
            raise IndexError("list index out of range")

    assert describe(IndexError()) == "IndexError"
    assert describe(Broken()) == "Broken"
    assert describe(ValueError("\n\n  second line\nthird")) == "ValueError: second line"


def test_disk_full_is_one_line_mentioning_the_disk(tmp_path, teacher_dir, corpus_dir):
    """A file-size limit (ulimit -f) stands in for a full disk: writes past it fail with EFBIG."""
    import resource

    limit = 64 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    r = subprocess.run(cli(*base(teacher_dir, corpus_dir, out, "--hidden-layers", "-1", "--max-tokens", 4000)), env=env(),
                       capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r.stderr, r"disk")
    assert not (out / "manifest.json").exists()


def test_read_only_out_folder(tmp_path, teacher_dir, corpus_dir):
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
        r = subprocess.run(cli(*base(teacher_dir, corpus_dir, ro / "out")), env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2
        one_error_line(r.stderr, r"read-only|permission denied")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        ro.chmod(0o755)


def test_no_loading_bar_with_no_progress(tmp_path, teacher_dir, corpus_dir):
    r = subprocess.run(cli(*base(teacher_dir, corpus_dir, tmp_path / "o")), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "%|" not in r.stderr


# --- 6. never write through a symlink ------------------------------------------------------------------------------------

def test_resume_into_a_folder_whose_shards_is_a_symlink_is_refused(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    assert invoke(*base(teacher_dir, corpus_dir, out, "--shard-size", 2)).exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    (out / "_progress").mkdir()
    (out / "_progress" / "settings.json").write_text(json.dumps(m["settings"]))
    (out / "manifest.json").unlink()
    target = tmp_path / "elsewhere"
    (out / "shards").rename(target)
    (target / "precious.txt").write_text("do not touch")
    (out / "shards").symlink_to(target)
    before = tree(target)
    assert_user_error(invoke(*base(teacher_dir, corpus_dir, out, "--shard-size", 2)), r"shards is a symlink")
    assert tree(target) == before
    (out / "shards").unlink()
    (out / "shards").mkdir()
    os.symlink(target / "precious.txt", out / "_progress" / "shard-00000.json")
    assert_user_error(invoke(*base(teacher_dir, corpus_dir, out, "--shard-size", 2)), r"shard-00000.json is a symlink")
    assert tree(target) == before


def test_path_identity_follows_contents_not_spelling(tmp_path, teacher_dir, monkeypatch):
    import shutil

    from pipeline.common.identity import path_identity

    copy = tmp_path / "t"
    shutil.copytree(teacher_dir, copy)
    ident = path_identity(str(copy))
    assert ident.startswith("local:") and ident == path_identity(str(teacher_dir))  # same files, another folder
    monkeypatch.chdir(tmp_path)
    assert path_identity("t") == path_identity("./t/") == ident
    (copy / "README.md").write_text("notes")  # does not change what the model computes
    assert path_identity("t") == ident
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert path_identity("t") != ident
    assert path_identity("org/name", "abc") == "hub:org/name@abc"


def test_behavioural_check_catches_a_model_that_sees_the_future():
    """Second line behind the config check: a BERT whose config the list would not know is still caught by behaviour."""
    import torch
    from transformers import AutoModelForCausalLM, BertConfig, LlamaConfig

    from pipeline.common.causal import sees_the_future

    torch.manual_seed(0)
    small = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)
    assert sees_the_future(AutoModelForCausalLM.from_config(BertConfig(**small))) is True
    assert sees_the_future(AutoModelForCausalLM.from_config(BertConfig(**small, is_decoder=True))) is False
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**small, num_key_value_heads=2))
    assert sees_the_future(llama) is False and llama.training  # the probe leaves the training mode as it was
    assert sees_the_future(llama.to(torch.bfloat16)) is None  # not probed below float32


def test_the_same_rank_cannot_run_twice(tmp_path):
    from pipeline.common.errors import UserError
    from pipeline.common.outdir import lock_rank, unlock_folder

    progress = tmp_path / "o" / "_progress"
    progress.mkdir(parents=True)
    code = ("import sys, time; from pathlib import Path; from pipeline.common.outdir import lock_rank; "
            "lock_rank(Path(sys.argv[1]), 0, 2); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(progress)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=r"--rank 0 of this capture is already running"):
            lock_rank(progress, 0, 2)
        unlock_folder(lock_rank(progress, 1, 2))  # the other rank is free
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    unlock_folder(lock_rank(progress, 0, 2))  # free again once its holder is killed
