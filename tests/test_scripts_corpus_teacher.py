"""scripts/make_corpus.py and scripts/make_teacher.py on a tiny fake stdlib, with tiny budgets (seconds, CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    """Import a script by path (scripts/ is not a package), once, under its own name as make_teacher does."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


make_corpus = _load("make_corpus")

# Chosen so the split has both sides: these names hash to held-out (pinned in test_split_is_pinned).
HELDOUT_NAMES = ["mod15.py", "mod47.py"]
TRAIN_NAMES = ["mod0.py", "mod1.py", "pkg/__init__.py", "pkg/core.py", "unittest/case.py", "deep/a/b/c.py"]
EXCLUDED = ["test/test_os.py", "tests/t.py", "pkg/tests/t.py", "deep/a/test/x.py", "idlelib/idle_test/t.py",
            "site-packages/foo/bar.py"]


def _source(i: int) -> str:
    """Python-looking text with enough repetition for a tiny BPE to learn merges and a tiny model to fit."""
    lines = [f"def function_{i}_{j}(value, other=None):\n    if other is None:\n        return value + {j}\n"
             f"    return [value, other, {i}]\n\n" for j in range(12)]
    return f'"""Module {i}."""\nimport os\n\n' + "".join(lines)


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    root = tmp_path / "stdlib"
    for i, rel in enumerate(HELDOUT_NAMES + TRAIN_NAMES + EXCLUDED):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(_source(i))
    (root / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")  # not UTF-8: skipped and counted
    (root / "notes.txt").write_text("not python\n")
    return root


def _paths(jsonl: Path) -> list[str]:
    return [json.loads(line)["path"] for line in jsonl.read_text().splitlines()]


def test_split_is_pinned():
    # The split must never move silently: held-out CE numbers across runs and machines depend on it.
    assert all(make_corpus.is_heldout(p) for p in HELDOUT_NAMES + ["argparse.py", "asyncio/events.py"])
    assert not any(make_corpus.is_heldout(p) for p in TRAIN_NAMES + ["os.py", "typing.py"])
    rate = sum(make_corpus.is_heldout(f"pkg{i}/mod{i}.py") for i in range(4000)) / 4000
    assert 0.04 < rate < 0.06


def test_build_corpus_splits_excludes_and_reuses(fake_stdlib, tmp_path):
    out = tmp_path / "corpus"
    info = make_corpus.build_corpus(out, stdlib=fake_stdlib)

    assert not info["reused"]
    assert _paths(out / "heldout.jsonl") == sorted(HELDOUT_NAMES)
    assert _paths(out / "train.jsonl") == sorted(TRAIN_NAMES)  # sorted, and no test folder at any depth
    assert info["skipped"] == 1 and info["skipped_paths"] == ["latin1.py"]
    assert info["files"] == len(HELDOUT_NAMES + TRAIN_NAMES)
    assert json.loads((out / "corpus.json").read_text())["splits"]["train"]["files"] == len(TRAIN_NAMES)
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert first["text"] == (fake_stdlib / first["path"]).read_text()
    assert not list(out.glob(".*tmp*"))  # temp files renamed away

    # same recipe: reused; another folder: byte-identical output
    assert make_corpus.build_corpus(out, stdlib=fake_stdlib)["reused"]
    other = make_corpus.build_corpus(tmp_path / "again", stdlib=fake_stdlib)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert other["splits"] == info["splits"]

    # a different split rule is a different recipe: rebuilt
    rebuilt = make_corpus.build_corpus(out, stdlib=fake_stdlib, heldout_percent=50)
    assert not rebuilt["reused"] and rebuilt["recipe"] != info["recipe"]


TINY = ["--vocab-size", "300", "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
        "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--eval-tokens", "256", "--warmup-steps", "1"]


def test_mixed_split_holds_the_same_documents_in_hash_order(fake_stdlib, tmp_path):
    import hashlib

    out = tmp_path / "corpus"
    make_corpus.build_corpus(out, stdlib=fake_stdlib)
    mixed = make_corpus.mixed_split(out, "train")
    rows = [json.loads(line) for line in mixed.read_text().splitlines()]
    original = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in original)
    keys = [hashlib.sha256(r["path"].encode()).hexdigest() for r in rows]
    assert keys == sorted(keys)
    assert make_corpus.mixed_split(out, "train").read_bytes() == mixed.read_bytes()


def test_make_teacher_tiny_saves_loadable_and_reuses(fake_stdlib, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    make_teacher = _load("make_teacher")
    args = ["--cache-dir", str(tmp_path / "cache"), "--stdlib", str(fake_stdlib), *TINY]
    make_teacher.main(args)
    captured = capsys.readouterr()
    folder = Path(captured.out.strip().splitlines()[-1])

    assert folder.parent == tmp_path / "cache" and folder.name.startswith("teacher-")
    report = json.loads((folder / "teacher.json").read_text())
    assert report["steps"] == 3 and report["tokens_seen"] == 3 * 2 * 32
    assert report["heldout_ce"] > 0 and report["unigram_ce"] > 0
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id == 0 and model.config.vocab_size == len(tok) == 300
    text = "def function_1_2(value, other=None):\n    return value\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 300) and torch.isfinite(logits).all()

    # unchanged recipe: cached teacher reused, same path; --out copies it and prints the copy
    out = tmp_path / "teacher"
    make_teacher.main(args + ["--out", str(out)])
    captured = capsys.readouterr()
    assert "reusing cached teacher at" in captured.err
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()

    # a setting that changes the result is a new recipe, hence a new folder
    make_teacher.main(args + ["--seed", "1"])
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) != folder


def test_make_teacher_rejects_bad_config_naming_every_problem():
    make_teacher = _load("make_teacher")
    cfg = make_teacher.parse_args(["--hidden", "30", "--heads", "4", "--vocab-size", "70000"])
    with pytest.raises(ValueError, match=r"(?s)vocab-size 70000.*--hidden 30 must be divisible by --heads 4"):
        make_teacher.validate(cfg)


def test_teacher_is_the_same_for_the_same_steps_and_the_cache_key_is_what_sets_the_weights(fake_stdlib, tmp_path, capsys):
    make_teacher = _load("make_teacher")
    base = ["--stdlib", str(fake_stdlib), *TINY]
    make_teacher.main(["--cache-dir", str(tmp_path / "a"), *base])
    first = Path(capsys.readouterr().out.strip().splitlines()[-1])
    # another machine (another cache): the same seeded recipe gives the same folder name and the same weights
    make_teacher.main(["--cache-dir", str(tmp_path / "b"), *base])
    second = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert first.name == second.name
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    # what is only measured or checked afterwards is not in the key: reused
    make_teacher.main(["--cache-dir", str(tmp_path / "a"), *base, "--eval-tokens", "128", "--min-gain", "-100"])
    captured = capsys.readouterr()
    assert "reusing cached teacher" in captured.err and captured.out.strip().splitlines()[-1] == str(first)
    # more steps: another teacher; a time limit is an explicit choice and recorded in the key
    make_teacher.main(["--cache-dir", str(tmp_path / "a"), *base, "--steps", "4"])
    more = Path(capsys.readouterr().out.strip().splitlines()[-1])
    make_teacher.main(["--cache-dir", str(tmp_path / "a"), *base, "--minutes", "5"])
    timed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert len({first, more, timed}) == 3
    assert json.loads((timed / "teacher.json").read_text())["recipe"]["settings"]["minutes"] == 5
    assert "minutes" not in json.loads((first / "teacher.json").read_text())["recipe"]["settings"]


def test_teacher_problem_needs_a_clear_margin_over_the_unigram_baseline():
    make_teacher = _load("make_teacher")
    report = {"heldout_ce": 6.613, "unigram_ce": 6.625, "steps": 66, "recipe": {"settings": {"minutes": 7}}}
    problem = make_teacher.teacher_problem(report, 1.0)
    assert problem.startswith("the teacher is too weak to distill from: its held-out CE is 6.613 nats/token, 0.012 "
                              "below the unigram baseline 6.625, but at least 1 below is expected; it was trained "
                              "66 steps (cut at 7 min). Train it longer: TEACHER_STEPS=")
    assert "8.852 nats/token, 2.227 above the unigram baseline" in make_teacher.teacher_problem(
        report | {"heldout_ce": 8.852}, 1.0)  # 2 steps from a random init: worse than unigram
    assert make_teacher.teacher_problem(report | {"heldout_ce": 5.625}, 1.0) is None  # exactly the margin: fine
    assert make_teacher.teacher_problem(report | {"heldout_ce": 5.626}, 1.0) is not None


def test_a_teacher_failing_the_check_stops_with_one_line_and_exit_2(fake_stdlib, tmp_path, capsys):
    make_teacher = _load("make_teacher")
    args = ["--cache-dir", str(tmp_path / "cache"), "--stdlib", str(fake_stdlib), *TINY, "--min-gain", "50"]
    with pytest.raises(SystemExit) as e:
        make_teacher.main(args)
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ""  # no folder printed: a shell script gets nothing to use
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: the teacher is too weak to distill from:") and "Traceback" not in captured.err
    assert "at least 50 below is expected; it was trained 3 steps" in last
    with pytest.raises(SystemExit):  # the cached teacher is checked too
        make_teacher.main(args)
    assert "reusing cached teacher" in capsys.readouterr().err


def test_kd_verdict_claims_an_effect_only_beyond_twice_the_seed_deviation():
    bench_train = _load("bench_train")
    assert bench_train.kd_verdict(5.30, 5.50, 0.02).startswith(
        "KD helped: held-out CE -0.2000 nats/token (-3.64%) against CE-only, more than twice the seed-to-seed "
        "standard deviation of 0.0200")
    assert bench_train.kd_verdict(5.60, 5.50, 0.02).startswith("KD hurt: held-out CE +0.1000")
    within = bench_train.kd_verdict(5.47, 5.50, 0.02)
    assert within.startswith("No measurable effect of KD: held-out CE -0.0300") and within.endswith("it is noise.")
    assert "yours differ" in bench_train.kd_verdict(5.47, 5.50, 0.02, measured_settings=False)
