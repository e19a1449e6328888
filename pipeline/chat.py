"""Examples → token ids and the trained-token flags: chat-template rendering and the spans the student learns.

Called by the capture (`pipeline.precompute`) between `pipeline.sources` (rows → examples) and `pipeline.packing`
(tokenized examples → windows). Every example becomes a `TokenizedExample`: its token ids and, per token, whether that
token is a *label the student learns* (1) or context only (0). A position's `loss_mask` in a window is then the flag of
its label token (`pipeline.packing`).

Spans without generation markers. Most chat templates have no `{% generation %}` markers, so the spans are found by
rendering prefixes of the conversation and diffing them: the trained part of assistant turn i is the text between the
rendering of `messages[:i]` with the generation prompt and the rendering of `messages[:i+1]`, i.e. the content and the
end-of-turn token that closes it (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`). Whitespace the template writes
after an end-of-turn token is layout, not something the model must produce, and is not trained. A template whose
shorter renderings are not prefixes of the full one (e.g. one that drops earlier reasoning) is refused, naming the fix.
The whole rendering is tokenized once and character spans are mapped to tokens through the offsets, so the ids are
exactly those `tokenizer.apply_chat_template(messages, tokenize=True)` gives (checked per example). A token whose
characters overlap a trained span is trained: a token that merges the prompt's last newline with the completion's first
indent holds completion text, and leaving it out would drop the start of every answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common.errors import UserError

TRAIN_ON = ("assistant", "completion", "all")
# The default of --train-on for each input format.
DEFAULT_TRAIN_ON = {"text": "all", "chat": "assistant", "prompt-completion": "completion"}


@dataclass
class TokenizedExample:
    """One example, ready for packing."""

    input_ids: np.ndarray  # (L,) int64 token ids
    trained: np.ndarray  # (L,) uint8: 1 where the token is a label the student learns (never the first token)


def load_chat_template(tokenizer, template_file: str | None) -> None:
    """Set the tokenizer's chat template from a Jinja file (`--chat-template FILE`), overriding any it had.

    The dataset stores this tokenizer, so the saved student carries the template too."""
    if template_file is None:
        return
    path = Path(template_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chat-template {template_file}: cannot read it ({type(e).__name__}); pass a UTF-8 Jinja file")
    if not text.strip():
        raise UserError(f"--chat-template {template_file}: the file is empty; pass a Jinja chat template")
    tokenizer.chat_template = text


def require_chat_template(tokenizer, what: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{what} needs a chat template, and the teacher's tokenizer has none; pass --chat-template FILE "
                        "(a Jinja template such as the one of the model family the teacher was trained with)")


def check_train_on(fmt: str, train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise UserError(f"--train-on is {train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    if fmt == "text" and train_on != "all":
        raise UserError(f"--train-on {train_on} needs conversational or prompt-completion data, and the data is plain "
                        "text; pass --train-on all (or --format chat / prompt-completion if the rows hold messages)")


def tokenize_examples(examples, tokenizer, train_on: str | None, eos_id: int):
    """Generator: normalized examples (`pipeline.sources.iter_examples`) → `TokenizedExample`s. `train_on` None takes
    each format's default (`DEFAULT_TRAIN_ON`), so a mix of text and chat sources trains each as its kind expects."""
    checked = set()
    for example in examples:
        fmt = example["format"]
        chosen = train_on or DEFAULT_TRAIN_ON[fmt]
        if fmt not in checked:
            check_train_on(fmt, chosen)
            checked.add(fmt)
        yield tokenize_example(example, tokenizer, chosen, eos_id)


def tokenize_example(example: dict, tokenizer, train_on: str, eos_id: int) -> TokenizedExample:
    """A normalized example from `pipeline.sources` (`{"format": ..., ...}`) → token ids and trained flags.

    - text: the text and EOS; every token after the first is trained.
    - chat (`messages`): rendered with the chat template; `assistant` trains every assistant turn, `completion` the
      last one, `all` every token.
    - prompt-completion: strings are joined (prompt, completion, EOS; TRL's convention) and the completion and EOS are
      trained; lists of messages are rendered as one conversation and the completion's turns are trained
      (`assistant`: only the assistant turns in prompt and completion).
    """
    fmt = example["format"]
    if fmt == "text":
        ids = tokenizer(example["text"], add_special_tokens=False, verbose=False)["input_ids"] + [eos_id]
        trained = np.ones(len(ids), np.uint8)
        trained[0] = 0
        return TokenizedExample(np.asarray(ids, np.int64), trained)
    if fmt == "prompt-completion" and isinstance(example["prompt"], str):
        prompt, completion = example["prompt"], example["completion"]
        text = prompt + completion
        spans = [(0, len(text))] if train_on == "all" else [(len(prompt), len(text))]
        ids, trained = _tokens_with_spans(tokenizer, text, spans)
        ids.append(eos_id)
        trained = np.append(trained, np.uint8(1))
        trained[0] = 0
        return TokenizedExample(np.asarray(ids, np.int64), trained)
    if fmt == "prompt-completion":
        messages = list(example["prompt"]) + list(example["completion"])
        n_prompt = len(example["prompt"])
    else:
        messages, n_prompt = list(example["messages"]), None
    text, spans = render_with_spans(tokenizer, messages, train_on, n_prompt)
    ids, trained = _tokens_with_spans(tokenizer, text, spans, layout_trained=train_on == "all")
    expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if hasattr(expected, "tolist"):
        expected = expected.tolist()
    if list(ids) != list(expected):  # an internal invariant; a failure would mean offsets we rely on are wrong
        raise AssertionError("tokenizing the rendered conversation gave other ids than apply_chat_template")
    trained[0] = 0
    return TokenizedExample(np.asarray(ids, np.int64), trained)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError (e.g. "roles must alternate") and others
        raise UserError(f"the chat template refused a conversation with roles {[m.get('role') for m in messages]} "
                        f"({type(e).__name__}: {e}); fix the data or pass a --chat-template that accepts it")


def render_with_spans(tokenizer, messages: list[dict], train_on: str, n_prompt: int | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans [start, end) the student learns.

    `n_prompt`: for conversational prompt-completion, the number of messages in the prompt (the rest is the completion).
    """
    require_chat_template(tokenizer, "conversational data")
    full = render(tokenizer, messages)
    if train_on == "all":
        return full, [(0, len(full))]
    if n_prompt is not None and train_on == "completion":
        before = render(tokenizer, messages[:n_prompt], add_generation_prompt=messages[n_prompt]["role"] == "assistant")
        _check_prefix(before, full, n_prompt)
        return full, [(len(before), len(full))]
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "completion":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        _check_prefix(before, through, i)
        _check_prefix(through, full, i + 1)
        spans.append((len(before), len(through)))
    return full, spans


def _check_prefix(prefix: str, full: str, n: int) -> None:
    if not full.startswith(prefix):
        raise UserError(f"the chat template renders the first {n} message(s) as text that is not a prefix of the whole "
                        "conversation (it rewrites earlier turns), so the tokens to train on cannot be located; pass a "
                        "--chat-template that renders turns in order, or --train-on all")


def _tokens_with_spans(tokenizer, text: str, spans: list[tuple[int, int]], layout_trained: bool = False) -> tuple[list[int], np.ndarray]:
    """Tokenize `text` once; a token is trained when its characters overlap a span, except (unless `layout_trained`)
    whitespace-only tokens that follow a special token at a span's end (the newline after `<|im_end|>`)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts = np.asarray([o[0] for o in offsets], np.int64)  # (L,)
    ends = np.asarray([o[1] for o in offsets], np.int64)
    trained = np.zeros(len(ids), np.uint8)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for a, b in spans:
        inside = np.flatnonzero((ends > a) & (starts < b))
        # trailing layout whitespace after an end-of-turn token is not trained
        while not layout_trained and len(inside) >= 2 and ids[inside[-2]] in special and not text[starts[inside[-1]]:ends[inside[-1]]].strip():
            inside = inside[:-1]
        trained[inside] = 1
    return list(ids), trained
