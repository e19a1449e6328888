"""pipeline/sources.py: local files and folders, Hugging Face dataset folders (save_to_disk and a card with configs),
fsspec URLs, format detection and forcing, the errors, mixing several inputs in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.common.errors import UserError
from pipeline.sources import SourceStats, iter_examples, source_kind, sources_fingerprint
from tests.pipeline.chat_templates import CONVERSATION

PC_STRINGS = {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}
PC_MESSAGES = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_formats_are_detected_from_the_columns(tmp_path, corpus_dir):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION, "id": 1}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [PC_STRINGS, PC_MESSAGES])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "x = 1\n"}, {"text": ""}])
    stats = SourceStats()
    got = list(iter_examples([str(chat), str(pc), str(text), str(corpus_dir)], stats=stats))
    assert got[0] == {"format": "chat", "messages": CONVERSATION}
    assert got[1] == {"format": "prompt-completion", **PC_STRINGS}
    assert got[2] == {"format": "prompt-completion", **PC_MESSAGES}
    assert got[3] == {"format": "text", "text": "x = 1\n"}  # the empty text is left out
    # a corpus folder reads as today: one document per file, in sorted order
    files = sorted(p for p in corpus_dir.iterdir())
    assert [e["text"] for e in got[4:]] == [p.read_text(encoding="utf-8") for p in files]
    assert stats.examples == {"chat": 1, "prompt-completion": 2, "text": 1 + len(files)}


def test_forced_format_and_errors_name_the_columns(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"cannot tell the format from the columns \['answer', 'question'\]; expected 'messages'"):
        list(iter_examples([str(rows)]))
    with pytest.raises(UserError, match=r"--format chat needs the column\(s\) \['messages'\], and the rows have \['answer', 'question'\]"):
        list(iter_examples([str(rows)], fmt="chat"))
    assert list(iter_examples([str(rows)], fmt="text", text_column="answer")) == [{"format": "text", "text": "a"}]
    # a chat row forced to text through another column
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION, "title": "t"}])
    assert list(iter_examples([str(chat)], fmt="text", text_column="title")) == [{"format": "text", "text": "t"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "text": "hi"}]}])
    with pytest.raises(UserError, match=r"a message in 'messages' is \['role', 'text'\], expected \{'role': str, 'content': str\}"):
        list(iter_examples([str(bad)]))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "completion": CONVERSATION[2:3]}])
    with pytest.raises(UserError, match="expected both strings or both lists"):
        list(iter_examples([str(mixed)]))
    with pytest.raises(UserError, match="--format is 'json'"):
        list(iter_examples([str(rows)], fmt="json"))


def test_dataset_folders_saved_and_with_a_card(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": CONVERSATION}]),
                          "test": datasets.Dataset.from_list([PC_STRINGS])}).save_to_disk(str(saved))
    assert source_kind(str(saved)) == "dataset_folder"
    assert list(iter_examples([str(saved)])) == [{"format": "chat", "messages": CONVERSATION}]
    assert list(iter_examples([str(saved)], split="test")) == [{"format": "prompt-completion", **PC_STRINGS}]
    with pytest.raises(UserError, match=r"no split 'dev'; it has \['test', 'train'\]; pass --data-split"):
        list(iter_examples([str(saved)], split="dev"))

    # a hub-style folder: a dataset card declaring two configs over JSON-lines files
    repo = tmp_path / "repo"
    (repo / "chat").mkdir(parents=True)
    (repo / "pc").mkdir()
    write_jsonl(repo / "chat" / "train.jsonl", [{"messages": CONVERSATION}])
    write_jsonl(repo / "pc" / "train.jsonl", [PC_STRINGS])
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: chat\n  data_files: chat/*.jsonl\n"
                                    "- config_name: pc\n  data_files: pc/*.jsonl\n---\n# A dataset\n", encoding="utf-8")
    assert source_kind(str(repo)) == "dataset_folder"
    assert list(iter_examples([str(repo)], config="pc")) == [{"format": "prompt-completion", **PC_STRINGS}]
    assert list(iter_examples([str(repo)], config="chat")) == [{"format": "chat", "messages": CONVERSATION}]
    # a README without such a header leaves a corpus folder a corpus folder
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("# notes\n", encoding="utf-8")
    assert source_kind(str(plain)) == "folder"


def test_fsspec_urls_of_files(tmp_path):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", [{"messages": CONVERSATION}])
    write_jsonl(tmp_path / "parts" / "b.jsonl", [PC_STRINGS])
    got = list(iter_examples([f"file://{tmp_path}/parts/*.jsonl"]))
    assert [e["format"] for e in got] == ["chat", "prompt-completion"]
    with fsspec.open("memory://bucket/data.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist([{"text": "a = 1\n"}, {"text": "b = 2\n"}]), f)
    assert [e["text"] for e in iter_examples(["memory://bucket/data.parquet"])] == ["a = 1\n", "b = 2\n"]
    with pytest.raises(UserError, match="no files found at that URL"):
        list(iter_examples([f"file://{tmp_path}/parts/*.parquet"]))


def test_hub_ids_offline_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert source_kind("someorg/some-dataset") == "hub"
    with pytest.raises(UserError, match="cannot load it as a dataset .*unset HF_DATASETS_OFFLINE"):
        list(iter_examples(["someorg/some-dataset"]))
    with pytest.raises(UserError, match="no such file or folder, and not a URL or a hub dataset id"):
        source_kind(str(tmp_path / "missing.jsonl"))


def test_fingerprint_follows_the_files(tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    before = sources_fingerprint([str(f)], "train", None)
    assert before == sources_fingerprint([str(f)], "train", None)
    write_jsonl(f, [{"messages": CONVERSATION[:3]}])
    assert sources_fingerprint([str(f)], "train", None) != before
    assert sources_fingerprint(["org/name"], "train", None) != sources_fingerprint(["org/name"], "test", None)
