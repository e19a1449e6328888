"""Check a dataset's `tokenizer/` folder against its manifest before anything loads it. Imports no torch.

transformers reads every file of a tokenizer folder and, with `auto_map`, would import code from it; the students a
dataset trains are saved with this tokenizer. So the folder must hold exactly the files the manifest lists, each with
its recorded size and sha256, no symlink or special file, no request for remote code, and `tokenizer.json` must
hash to `tokenizer.sha256` and hold `tokenizer.vocab_size` ids.
"""

from __future__ import annotations

import hashlib
import json

from ..common.errors import FormatError
from ..common.files import check_plain, walk_plain
from .files import HASH_BLOCK
from .sections import Tokenizer

TOKENIZER_DIR = "tokenizer"


def _fail(where: str, msg: str):
    raise FormatError(f"{where}: {msg}; the dataset's tokenizer was altered or damaged: re-copy the dataset or rerun "
                      "`distill precompute`")


def tokenizer_vocab_size(parsed: dict) -> int | None:
    """Number of ids of a `tokenizer.json` (model vocabulary plus added tokens), as `len(tokenizer)` counts them."""
    model = parsed.get("model") if isinstance(parsed, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        ids = {v for v in vocab.values() if type(v) is int}
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
        ids = set(range(len(vocab)))
    else:
        return None
    ids |= {t.get("id") for t in parsed.get("added_tokens") or [] if isinstance(t, dict) and type(t.get("id")) is int}
    return len(ids)


def check_tokenizer_files(ds) -> None:
    """Raise FormatError naming the first tokenizer file that does not match the manifest (or asks for remote code).

    Skipped when the manifest lists no tokenizer files (a hand-made dataset); `verify` requires them.
    """
    recorded = ds.manifest.tokenizer
    listed = recorded.files
    if listed is None:
        return
    folder = f"{ds.root}/{TOKENIZER_DIR}"
    where = f"{ds.url}/{TOKENIZER_DIR}"
    if ds.is_local:
        present = walk_plain(check_plain(ds.root, TOKENIZER_DIR, kind="dir"))
    else:
        if not ds.fs.isdir(folder):
            _fail(where, "is missing")
        present = sorted(p[len(folder) + 1:] for p in ds.fs.find(folder))
    extra = sorted(set(present) - set(listed))
    if extra:
        _fail(f"{where}/{extra[0]}", "is not listed in manifest.json (tokenizer.files), yet transformers would read it")
    missing = sorted(set(listed) - set(present))
    if missing:
        _fail(f"{where}/{missing[0]}", "is listed in manifest.json but missing")
    contents = {}
    for name, meta in sorted(listed.items()):
        path = f"{folder}/{name}"
        size = ds.fs.size(path)
        if size != meta.bytes:
            _fail(f"{where}/{name}", f"has {size} bytes, the manifest says {meta.bytes}")
        h, data = hashlib.sha256(), bytearray()
        with ds.fs.open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                h.update(block)
                if name.endswith(".json"):
                    data += block
        if h.hexdigest() != meta.sha256:
            _fail(f"{where}/{name}", f"checksum mismatch (manifest {meta.sha256[:12]}…, file {h.hexdigest()[:12]}…)")
        if name.endswith(".json"):
            try:
                contents[name] = json.loads(bytes(data))
            except ValueError as e:
                _fail(f"{where}/{name}", f"is not valid JSON ({e})")
    for name, parsed in contents.items():
        if isinstance(parsed, dict) and "auto_map" in parsed:
            _fail(f"{where}/{name}", f"asks for remote code (auto_map {json.dumps(parsed['auto_map'])[:80]}); distill never "
                  "runs code that comes with a dataset")
    _check_special_tokens(recorded, contents, where)
    parsed = contents.get("tokenizer.json")
    if parsed is not None:
        text = json.dumps(parsed, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest != recorded.sha256:
            _fail(f"{where}/tokenizer.json", f"hashes to {digest[:12]}… but manifest.json's tokenizer.sha256 is {recorded.sha256[:12]}…")
        n = tokenizer_vocab_size(parsed)
        if n is not None and recorded.vocab_size is not None and n != recorded.vocab_size:
            _fail(f"{where}/tokenizer.json", f"holds {n} token ids but manifest.json's tokenizer.vocab_size is {recorded.vocab_size}")


def _token_ids(parsed) -> dict:
    """token text -> id from a tokenizer.json (vocabulary and added tokens)."""
    model = parsed.get("model") if isinstance(parsed, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    for t in (parsed.get("added_tokens") or []) if isinstance(parsed, dict) else []:
        if isinstance(t, dict) and isinstance(t.get("content"), str):
            ids[t["content"]] = t.get("id")
    return ids


def _check_special_tokens(recorded: Tokenizer, contents: dict, where: str) -> None:
    """The manifest's special tokens are those of tokenizer_config.json, and their ids those of tokenizer.json."""
    config = contents.get("tokenizer_config.json")
    specials = recorded.special_tokens
    if isinstance(config, dict) and isinstance(specials, dict):
        for key, text in specials.items():
            found = config.get(key)
            found = found.get("content") if isinstance(found, dict) else found
            if key in ("bos_token", "eos_token", "pad_token", "unk_token") and found != text:
                _fail(f"{where}/tokenizer_config.json", f"{key} is {found!r} but manifest.json's tokenizer.special_tokens "
                      f"says {text!r}")
    parsed = contents.get("tokenizer.json")
    if parsed is None or not isinstance(specials, dict):
        return
    ids = _token_ids(parsed)
    for key in ("bos", "eos", "pad"):
        text, expected = specials.get(f"{key}_token"), getattr(recorded, f"{key}_token_id")
        if isinstance(text, str) and expected is not None and ids.get(text) != expected:
            _fail(f"{where}/tokenizer.json", f"{key} token {text!r} has id {ids.get(text)!r} but manifest.json's "
                  f"tokenizer.{key}_token_id is {expected}")
