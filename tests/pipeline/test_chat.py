"""pipeline/chat.py: rendering with real template styles, trained spans without generation markers, ids as the template
gives them, the errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.chat import load_chat_template, render_with_spans, tokenize_example
from pipeline.common.errors import UserError
from tests.pipeline.chat_templates import ALTERNATING, CONVERSATION, STYLES, chat_tokenizer


def trained_runs(tok, ex) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    runs, current = [], []
    for i, flag in zip(ex.input_ids.tolist(), ex.trained.tolist()):
        if flag:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def conversation(style):
    return ALTERNATING if style == "mistral" else CONVERSATION


@pytest.mark.parametrize("style", sorted(STYLES))
def test_assistant_turns_and_their_end_of_turn_are_trained(tokenizer_dir, style):
    tok = chat_tokenizer(tokenizer_dir, style)
    messages = conversation(style)
    ex = tokenize_example({"format": "chat", "messages": messages}, tok, "assistant", tok.eos_token_id)
    # the ids are exactly those the template gives
    assert ex.input_ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    end = STYLES[style][4]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained_runs(tok, ex) == [a + end for a in answers]
    # the end-of-turn token itself is trained, the template's layout after it is not
    end_id = tok.convert_tokens_to_ids(end)
    ends = np.flatnonzero(ex.input_ids == end_id)
    assert ex.trained[ends].tolist().count(1) == len(answers)
    if style != "mistral":  # with the system turn, prompts are most of the tokens
        assert ex.trained.sum() < len(ex.trained) / 2


@pytest.mark.parametrize("style", sorted(STYLES))
def test_completion_trains_the_last_turn_and_all_every_token(tokenizer_dir, style):
    tok = chat_tokenizer(tokenizer_dir, style)
    messages = conversation(style)
    last = tokenize_example({"format": "chat", "messages": messages}, tok, "completion", tok.eos_token_id)
    assert trained_runs(tok, last) == [messages[-1]["content"] + STYLES[style][4]]
    every = tokenize_example({"format": "chat", "messages": messages}, tok, "all", tok.eos_token_id)
    assert every.trained.tolist() == [0] + [1] * (len(every.trained) - 1)


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_conversational_prompt_completion(tokenizer_dir, style):
    tok = chat_tokenizer(tokenizer_dir, style)
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]
    ex = tokenize_example({"format": "prompt-completion", "prompt": prompt, "completion": completion}, tok, "completion",
                          tok.eos_token_id)
    assert trained_runs(tok, ex) == [completion[0]["content"] + STYLES[style][4]]
    # `assistant` also trains the assistant turn inside the prompt
    ex = tokenize_example({"format": "prompt-completion", "prompt": prompt, "completion": completion}, tok, "assistant",
                          tok.eos_token_id)
    assert len(trained_runs(tok, ex)) == 2


def test_string_prompt_completion_and_text(tokenizer_dir):
    tok = chat_tokenizer(tokenizer_dir, "chatml")
    eos = tok.eos_token_id
    ex = tokenize_example({"format": "prompt-completion", "prompt": "def f(x):\n", "completion": "    return x\n"}, tok,
                          "completion", eos)
    assert ex.input_ids[-1] == eos
    # "\n    " is one token spanning the prompt's end and the completion's start: it holds completion text, so it is
    # trained (the overlap rule); nothing of the completion is left out
    assert trained_runs(tok, ex) == ["\n    return x\n" + tok.eos_token]
    ex = tokenize_example({"format": "prompt-completion", "prompt": "def f(x):", "completion": " return x"}, tok, "completion", eos)
    assert trained_runs(tok, ex) == [" return x" + tok.eos_token]
    text = tokenize_example({"format": "text", "text": "import os\n"}, tok, "all", eos)
    assert text.input_ids.tolist() == tok("import os\n", add_special_tokens=False)["input_ids"] + [eos]
    assert text.trained.tolist() == [0] + [1] * (len(text.trained) - 1)


def test_no_template_is_one_clear_error_and_a_file_sets_one(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = None
    with pytest.raises(UserError, match="has none; pass --chat-template FILE"):
        tokenize_example({"format": "chat", "messages": CONVERSATION}, tok, "assistant", tok.eos_token_id)
    path = tmp_path / "chatml.jinja"
    path.write_text(STYLES["chatml"][0], encoding="utf-8")
    tok.add_special_tokens({"additional_special_tokens": STYLES["chatml"][1]})
    load_chat_template(tok, str(path))
    ex = tokenize_example({"format": "chat", "messages": CONVERSATION}, tok, "assistant", tok.eos_token_id)
    assert len(trained_runs(tok, ex)) == 2
    with pytest.raises(UserError, match="cannot read it"):
        load_chat_template(tok, str(tmp_path / "missing.jinja"))


def test_template_refusals_name_the_fix(tokenizer_dir):
    tok = chat_tokenizer(tokenizer_dir, "mistral")
    with pytest.raises(UserError, match="roles must alternate"):
        tokenize_example({"format": "chat", "messages": CONVERSATION}, tok, "assistant", tok.eos_token_id)
    # a template that rewrites earlier turns (drops all but the last assistant turn's content)
    tok = chat_tokenizer(tokenizer_dir, "chatml")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n"
                         "<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(UserError, match="not a prefix of the whole conversation"):
        render_with_spans(tok, CONVERSATION, "assistant")


def test_mixed_sources_take_each_formats_default_and_the_template_is_saved(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.chat import tokenize_examples

    tok = chat_tokenizer(tokenizer_dir, "gemma")
    rows = [{"format": "text", "text": "x = 1\n"}, {"format": "chat", "messages": CONVERSATION}]
    text, chat = list(tokenize_examples(rows, tok, None, tok.eos_token_id))
    assert text.trained[1:].all() and len(trained_runs(tok, chat)) == 2
    with pytest.raises(UserError, match="--train-on assistant needs conversational or prompt-completion data"):
        list(tokenize_examples(rows, tok, "assistant", tok.eos_token_id))
    # the dataset stores this tokenizer: the template travels with it to the student
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert again.chat_template == STYLES["gemma"][0]
    assert again.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == chat.input_ids.tolist()
