"""Chat-template fixtures: four real template styles written here as Jinja, set on the project's fixture tokenizer with
the special tokens each needs. None has generation markers (the common case). Shared by the chat and packing tests."""

from __future__ import annotations

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}"
    "{% set role = m['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)

# style: (template, special tokens to add, bos, eos, the end-of-turn token that closes an assistant turn)
STYLES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], None, None, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               None, "<|eot_id|>"),
    "gemma": (GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", None, "<end_of_turn>"),
    "mistral": (MISTRAL, ["<s>", "</s>"], "<s>", "</s>", "</s>"),
}


def chat_tokenizer(tokenizer_dir, style: str):
    """The fixture tokenizer with `style`'s template and special tokens."""
    from transformers import AutoTokenizer

    template, specials, bos, eos, _ = STYLES[style]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does textwrap.dedent do?"},
    {"role": "assistant", "content": "Remove any common leading whitespace from every line in text."},
    {"role": "user", "content": "And bisect.insort?"},
    {"role": "assistant", "content": "Insert item x in list a, and keep it sorted."},
]
# Mistral-style templates accept only alternating user/assistant turns.
ALTERNATING = CONVERSATION[1:]
