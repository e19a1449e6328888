"""scripts/make_teacher.py --chat (scripts/chat_teacher.py) and scripts/bench_chat.py on a tiny teacher trained here
from a fake stdlib with docstrings: the chat format it gets, the fine-tune's cache, and the chat bench end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_scripts_chat_corpus import SOURCE
from tests.test_scripts_corpus_teacher import TINY, _load, _source

make_teacher = _load("make_teacher")
chat_teacher = _load("chat_teacher")
bench_chat = _load("bench_chat")

# mod15.py hashes to held-out (pinned in tests/test_scripts_corpus_teacher.py); the others train
FILES = ["mod0.py", "mod1.py", "mod15.py", "pkg/core.py"]
CHAT = ["--chat", "--chat-steps", "2", "--chat-fraction", "0.5"]  # one conversation and one text window a step
QUESTION = [{"role": "user", "content": "What does f do?"}, {"role": "assistant", "content": "It adds one."}]


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stdlib")
    for i, rel in enumerate(FILES):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(SOURCE + _source(i))  # docstrings (conversations) and enough text for the tiny BPE
    return root


@pytest.fixture(scope="module")
def args(stdlib, tmp_path_factory) -> list[str]:
    return ["--cache-dir", str(tmp_path_factory.mktemp("cache")), "--stdlib", str(stdlib), *TINY]


@pytest.fixture(scope="module")
def text_teacher(args) -> Path:
    return make_teacher.make_teacher(make_teacher.parse_args(args))


@pytest.fixture(scope="module")
def chat_folder(args) -> Path:
    return make_teacher.make_teacher(make_teacher.parse_args(args + CHAT))


def test_to_chat_adds_single_id_special_tokens_and_keeps_every_old_logit(text_teacher):
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(text_teacher, dtype=torch.float32)
    model, tok = chat_teacher.to_chat(text_teacher)
    assert len(tok) == model.config.vocab_size == 302
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [300, 301]
    assert tok.apply_chat_template(QUESTION, tokenize=False) == (
        "<|endoftext|><|im_start|>user\nWhat does f do?<|im_end|>\n<|im_start|>assistant\nIt adds one.<|im_end|>\n")
    ids = tok.apply_chat_template(QUESTION, tokenize=True, return_dict=False)
    assert ids[:2] == [0, 300] and ids.count(300) == 2 and ids.count(301) == 2  # each special token is one id
    assert tok.decode(ids) == tok.apply_chat_template(QUESTION, tokenize=False)

    emb = model.get_input_embeddings().weight
    assert emb is model.get_output_embeddings().weight  # still tied
    old = before.get_input_embeddings().weight
    assert torch.equal(emb[:300], old) and torch.allclose(emb[300], old.mean(0)) and torch.allclose(emb[301], old.mean(0))
    text = tok("def function_1_2(value, other=None):\n    return value\n", add_special_tokens=False)["input_ids"]
    x = torch.tensor([text])
    with torch.no_grad():
        new_logits, old_logits = model(input_ids=x).logits, before(input_ids=x).logits  # (1, L, 302), (1, L, 300)
    assert new_logits.shape[-1] == 302
    torch.testing.assert_close(new_logits[..., :300], old_logits, rtol=0, atol=1e-5)


def test_chat_teacher_is_saved_with_its_template_and_cached_by_recipe(chat_folder, text_teacher, args, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat import tokenize_example

    assert chat_folder.name.startswith("chat-teacher-") and chat_folder.parent == text_teacher.parent
    report = json.loads((chat_folder / "teacher.json").read_text())
    # the text teacher's recipe (and folder) does not depend on the chat settings
    assert report["base_teacher"] == str(text_teacher) and report["recipe"]["base"] == text_teacher.name
    assert make_teacher.teacher_recipe(make_teacher.parse_args(args + ["--chat", "--chat-steps", "9"]), {}) == \
        make_teacher.teacher_recipe(make_teacher.parse_args(args), {})
    assert report["steps"] == 2 and report["tokens_seen"] == 2 * 2 * 32 and report["conversation_windows_per_step"] == 1
    assert report["special_tokens"] == {"<|endoftext|>": 0, "<|im_start|>": 300, "<|im_end|>": 301}
    assert 0 < report["assistant_ce_after"] < 20 and 0 < report["assistant_unigram_ce"] < 20

    tok = AutoTokenizer.from_pretrained(chat_folder)
    model = AutoModelForCausalLM.from_pretrained(chat_folder)
    assert tok.chat_template == chat_teacher.CHATML and model.config.vocab_size == len(tok) == 302
    held = [json.loads(line)["messages"] for line in
            (text_teacher.parent / "corpus" / "chat-heldout.jsonl").read_text().splitlines()]
    assert len(held) == report["heldout_conversations"] == 3
    # what precompute --train-on assistant trains is the answer and its <|im_end|>; the report scored those tokens
    ex = tokenize_example({"format": "chat", "messages": held[0]}, tok, "assistant", tok.eos_token_id)
    assert tok.decode(ex.input_ids[ex.trained == 1]) == held[0][1]["content"] + "<|im_end|>"
    counted = sum(int(tokenize_example({"format": "chat", "messages": m}, tok, "assistant", 0).trained.sum()) for m in held)
    assert report["assistant_eval_tokens"] == counted

    # unchanged recipe: reused; another fine-tune: another folder, same base
    again = make_teacher.make_teacher(make_teacher.parse_args(args + CHAT))
    assert again == chat_folder and "reusing cached chat teacher" in capsys.readouterr().err
    other = make_teacher.make_teacher(make_teacher.parse_args(args + CHAT + ["--chat-steps", "1"]))
    assert other != chat_folder and json.loads((other / "teacher.json").read_text())["base_teacher"] == str(text_teacher)


def test_assistant_ce_scores_exactly_the_trained_tokens(text_teacher):
    model, tok = chat_teacher.to_chat(text_teacher)
    cfg = make_teacher.parse_args(["--dtype", "float32"])
    targets, cut = chat_teacher.assistant_targets(tok, [QUESTION], max_len=1024)
    ids, trained = targets[0]
    assert cut == 0 and tok.decode(ids[trained == 1]) == "It adds one.<|im_end|>"
    ce, n = chat_teacher.assistant_ce(model, targets, cfg)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.from_numpy(ids)[None]).logits[0].double(), -1)  # (L, V)
    expected = -np.mean([logp[p - 1, ids[p]].item() for p in np.flatnonzero(trained)])
    assert n == int(trained.sum()) and ce == pytest.approx(expected, rel=1e-4)
    # in pieces of 4 (+1) tokens: every trained token once, seen from the start of its piece only
    ce4, n4 = chat_teacher.assistant_ce(model, targets, make_teacher.parse_args(["--dtype", "float32", "--seq-len", "4"]))
    by_hand = []
    for p in np.flatnonzero(trained):
        a = (p - 1) // 4 * 4  # the piece whose labels hold token p
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids[a:p])[None]).logits[0, -1].double()  # (V,)
        by_hand.append(-torch.log_softmax(logits, -1)[ids[p]].item())
    assert n4 == n and ce4 == pytest.approx(np.mean(by_hand), rel=1e-4) and ce4 != pytest.approx(ce, rel=1e-3)
    assert chat_teacher.assistant_targets(tok, [QUESTION], max_len=5)[1] == 1  # cut and counted


def test_bench_chat_orders_conversations_by_name_hash(tmp_path):
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    corpus.mkdir(), work.mkdir()
    rows = [{"messages": QUESTION, "path": "m.py", "name": f"m.f{i}"} for i in range(20)]
    (corpus / "chat-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = bench_chat.mixed_conversations(corpus, work)
    names = [json.loads(line)["name"] for line in out.read_text().splitlines()]
    assert sorted(names) == sorted(r["name"] for r in rows)
    assert names == sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest()) != [r["name"] for r in rows]


def test_bench_chat_end_to_end_on_the_tiny_chat_teacher(chat_folder, tmp_path, capsys):
    student = tmp_path / "student.json"  # no vocab_size: the dataset's (the chat teacher's 302) is used
    student.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64, "tie_word_embeddings": True}))
    bench_chat.main(["--teacher", str(chat_folder), "--corpus", str(chat_folder.parent / "corpus"),
                     "--work", str(tmp_path / "work"), "--student-config", str(student), "--tokens", "1024",
                     "--seq-len", "32", "--steps", "2", "--batch-size", "2", "--seeds", "0", "1",
                     "--capture-dtype", "float32", "--train-dtype", "float32", "--log-every", "1"])
    rows = json.loads((tmp_path / "work" / chat_folder.name / "rows.json").read_text())  # per teacher
    cap, teacher, quality = rows[0], rows[1], rows[2:]
    assert 0 < cap["trained"]["train"] < cap["positions"]["train"]  # assistant tokens only
    assert 0 < cap["trained"]["heldout"] < cap["positions"]["heldout"]
    assert [(r["variant"], r["seed"]) for r in quality] == [("CE only", 0), ("CE only", 1), ("top-64 tail", 0),
                                                            ("top-64 tail", 1), ("top-64 renormalize", 0),
                                                            ("top-64 renormalize", 1)]
    assert all(0 < r["held_out_ce"] < 20 for r in quality + [teacher])
    out = capsys.readouterr().out
    assert "| CE only | 2 |" in out and "| top-64 tail | 2 |" in out and "| top-64 renormalize | 2 |" in out and "teacher on the held-out" in out


def test_chat_loss_all_is_another_recipe_and_the_stream_flags_the_answers(chat_folder, text_teacher, args):
    every = make_teacher.make_teacher(make_teacher.parse_args(args + CHAT + ["--chat-loss", "all"]))
    assert every != chat_folder
    assert json.loads((chat_folder / "teacher.json").read_text())["recipe"]["settings"]["chat_loss"] == "assistant"
    # all: not in the key, so the teachers cached before the option (they learned every token) keep theirs
    assert "chat_loss" not in json.loads((every / "teacher.json").read_text())["recipe"]["settings"]
    _, tok = chat_teacher.to_chat(text_teacher)
    targets, _ = chat_teacher.assistant_targets(tok, [QUESTION, QUESTION[:1] + [{"role": "assistant", "content": "No."}]],
                                                max_len=None)
    ids, trained = chat_teacher.conversation_stream(targets)
    assert ids.shape == trained.shape and ids.tolist() == targets[0][0].tolist() + targets[1][0].tolist()
    assert tok.decode(ids[trained == 1]) == "It adds one.<|im_end|>No.<|im_end|>"
    with pytest.raises(ValueError, match="--chat-loss 'some' must be all or assistant"):
        make_teacher.validate(dataclasses.replace(make_teacher.parse_args([]), chat_loss="some"))
    with pytest.raises(SystemExit):  # the command line offers only the two
        make_teacher.parse_args(["--chat-loss", "some"])
