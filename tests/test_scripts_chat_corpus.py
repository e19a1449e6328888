"""scripts/make_corpus.py --chat: conversations from real definitions, split by file like the text corpus, reused when
unchanged; they tokenize through pipeline.chat with a real template."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_scripts_corpus_teacher import make_corpus

SOURCE = '''"""A module."""


def public(value, other=None):
    """Return value plus one, or other when it is given."""
    return value + 1 if other is None else other


def short():
    """Close."""


def _private():
    """Helpers that start with an underscore are left out."""


class Stack:
    """A last-in, first-out list of items."""

    def push(self, item):
        """Put item on top of the stack."""
        self.items.append(item)
'''


def test_chat_corpus_from_definitions(tmp_path):
    root = tmp_path / "stdlib"
    for rel in ("mod0.py", "mod15.py", "pkg/__init__.py"):  # mod15 hashes to held-out (tests/test_scripts_corpus_teacher.py)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(SOURCE)
    (root / "broken.py").write_text("def f(:\n")  # not Python: no conversations
    out = tmp_path / "corpus"
    info = make_corpus.build_chat_corpus(out, stdlib=root)
    assert not info["reused"]
    assert info["splits"]["train"] == {**info["splits"]["train"], "conversations": 6, "files": 2}
    assert info["splits"]["heldout"]["conversations"] == 3
    rows = [json.loads(line) for line in (out / "chat-train.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows[:3]] == ["mod0.public", "mod0.Stack", "mod0.Stack.push"]
    assert rows[3]["name"] == "pkg.public"
    user, assistant = rows[0]["messages"]
    assert user["role"] == "user" and assistant == {"role": "assistant", "content": "Return value plus one, or other when it is given."}
    assert "def public(value, other=None):" in user["content"] and "return value + 1" in user["content"]
    assert '"""' not in user["content"]  # the answer is not in the question
    held = [json.loads(line)["path"] for line in (out / "chat-heldout.jsonl").read_text().splitlines()]
    assert set(held) == {"mod15.py"}
    assert make_corpus.build_chat_corpus(out, stdlib=root)["reused"]


def test_chat_flag_on_the_command_line(tmp_path, tokenizer_dir):
    root = tmp_path / "stdlib"
    root.mkdir()
    (root / "mod0.py").write_text(SOURCE)
    out = tmp_path / "corpus"
    script = Path(make_corpus.__file__)
    run = subprocess.run([sys.executable, str(script), "--out", str(out), "--stdlib", str(root), "--chat"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote chat corpus: train 3 conversations from 1 files" in run.stderr
    from pipeline.chat import tokenize_example
    from pipeline.sources import iter_examples
    from tests.pipeline.chat_templates import chat_tokenizer

    tok = chat_tokenizer(tokenizer_dir, "chatml")
    examples = list(iter_examples([str(out / "chat-train.jsonl")]))
    assert [e["format"] for e in examples] == ["chat"] * 3
    ex = tokenize_example(examples[0], tok, "assistant", tok.eos_token_id)
    assert tok.decode(ex.input_ids[ex.trained == 1]) == "Return value plus one, or other when it is given.<|im_end|>"
