"""Identity of a tokenizer: what stage two compares to refuse a student whose tokenizer differs from the teacher's.

Imports no torch; takes a transformers tokenizer object.
"""

from __future__ import annotations

import hashlib
import json

from .sections import Tokenizer


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's serialized form (the fast tokenizer's JSON with its vocabulary, merges and specials).

    The JSON is re-serialized with sorted keys so two saves of the same tokenizer hash alike.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = json.dumps(json.loads(backend.to_str()), sort_keys=True, ensure_ascii=False)
    else:  # slow tokenizer: the vocabulary is what defines the ids
        text = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_record(tokenizer) -> Tokenizer:
    """The manifest's `tokenizer` section (without its files: the precompute adds them once the tokenizer is saved)."""
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return Tokenizer(class_name=type(tokenizer).__name__, vocab_size=len(tokenizer), sha256=tokenizer_sha256(tokenizer),
                     special_tokens=specials, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
