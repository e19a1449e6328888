"""Every bad input of `distill precompute` gives one clear line, a non-zero exit, no traceback, and overwrites nothing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.common.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def base(teacher, data, out, *extra):
    return ["precompute", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", 16, "--top-k", 4,
            "--max-tokens", 200, "--no-progress", *extra]


def assert_user_error(result, pattern):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_happy_path_then_inspect_and_verify(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    r = invoke(*base(teacher_dir, corpus_dir, out))
    assert r.exit_code == 0, r.output
    r = invoke("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["top_k"] == 4 and s["valid_tokens"] == 200 and s["shards"] >= 1 and s["bytes_per_token"] > 0
    assert 0 < s["topk_mass_mean"] <= 1.0001
    r = invoke("inspect", out)
    assert r.exit_code == 0 and "bytes_per_token" in r.output
    r = invoke("verify", out)
    assert r.exit_code == 0 and r.output.startswith("ok:")


def test_missing_teacher(tmp_path, corpus_dir):
    assert_user_error(invoke(*base(tmp_path / "nope", corpus_dir, tmp_path / "o")), r"--teacher .*nope: no such folder")


def test_missing_data(tmp_path, teacher_dir):
    assert_user_error(invoke(*base(teacher_dir, tmp_path / "nothing", tmp_path / "o")), r"--data .*nothing: no such file or folder")


def test_empty_corpus(tmp_path, teacher_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("")
    assert_user_error(invoke(*base(teacher_dir, tmp_path / "empty", tmp_path / "o")), r"corpus is empty")


def test_missing_text_column(tmp_path, teacher_dir):
    f = tmp_path / "d.jsonl"
    f.write_text('{"content": "def f(): pass", "id": 1}\n')
    assert_user_error(invoke(*base(teacher_dir, f, tmp_path / "o")),
                      r"cannot tell the format from the columns \['content', 'id'\].*--text-column names another")


@pytest.mark.parametrize("k", [0, 321])
def test_bad_k(tmp_path, teacher_dir, corpus_dir, k):
    args = base(teacher_dir, corpus_dir, tmp_path / "o")
    args[args.index("--top-k") + 1] = k
    pattern = "expected 1 or more" if k == 0 else r"larger than the teacher's vocabulary \(320\)"
    assert_user_error(invoke(*args), pattern)


def test_hidden_layer_out_of_range(tmp_path, teacher_dir, corpus_dir):
    r = invoke(*base(teacher_dir, corpus_dir, tmp_path / "o", "--hidden-layers", "1,7"))
    assert_user_error(r, r"--hidden-layers 7 is out of range.*valid: -3\.\.2")


def test_seq_len_above_teacher_maximum(tmp_path, teacher_dir, corpus_dir):
    args = base(teacher_dir, corpus_dir, tmp_path / "o")
    args[args.index("--seq-len") + 1] = 128
    assert_user_error(invoke(*args), r"--seq-len 128 is above the teacher's maximum positions \(64\)")


def test_other_settings_on_existing_output_are_refused(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    assert invoke(*base(teacher_dir, corpus_dir, out)).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = base(teacher_dir, corpus_dir, out)
    args[args.index("--top-k") + 1] = 5
    assert_user_error(invoke(*args), r"other settings \(top_k: 4 → 5\)")
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_foreign_non_empty_output_is_refused(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_user_error(invoke(*base(teacher_dir, corpus_dir, out)), r"not empty and holds no distill dataset")
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_undecodable_files_are_skipped_and_counted(tmp_path, teacher_dir, corpus_dir):
    data = tmp_path / "mixed"
    data.mkdir()
    (data / "good.py").write_text((corpus_dir / "bisect.py").read_text())
    (data / "bad.bin").write_bytes(b"\xff\xfe\x00\x81" * 50)
    r = CliRunner().invoke(main, [str(a) for a in base(teacher_dir, data, tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "skipped 1 undecodable file(s)" in r.output and "bad.bin" in r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["corpus"]["skipped_files"] == 1 and m["corpus"]["documents"] == 1


def test_not_a_causal_lm(tmp_path, tokenizer_dir, corpus_dir):
    from transformers import AutoTokenizer, T5Config

    d = tmp_path / "t5"
    T5Config(vocab_size=320, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(str(d))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(d))
    assert_user_error(invoke(*base(d, corpus_dir, tmp_path / "o")), r"not a causal .*language model")


def test_inspect_on_a_non_dataset(tmp_path):
    assert_user_error(invoke("inspect", tmp_path), r"no manifest.json")


def test_verify_refuses_newer_format(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    assert invoke(*base(teacher_dir, corpus_dir, out)).exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    assert_user_error(invoke("verify", out), r"format version 99 is newer .*upgrade offline-distill")


def test_manifest_paths_cannot_escape(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "out"
    assert invoke(*base(teacher_dir, corpus_dir, out)).exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["name"] = "../../etc"
    (out / "manifest.json").write_text(json.dumps(m))
    assert_user_error(invoke("verify", out), r"not a plain relative path")
