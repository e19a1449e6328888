"""What a path names, independent of how it was typed: resume compares these, never the strings the user typed.

`../fx/teacher`, `/abs/fx/teacher` and `teacher` typed from another working directory are one model; a resume must not
refuse them. Used by `pipeline.precompute` (the teacher in the capture settings) and `trainer.train` (student, student
config and online teacher of a run). Imports no torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_BYTES = 1 << 16  # hashed from the start and the end of each file: cheap for 100 GB of weights
# Files of a model folder that decide what it computes: config, weights, tokenizer, remote code. Notes (README), run
# outputs in sub-folders (a student saved by `distill train` holds checkpoints/) do not, and from_pretrained reads only
# the top level.
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".tiktoken", ".txt", ".py")


def file_fingerprint(path: Path, h=None) -> str:
    """sha256 over a file's size and its first and last 64 KiB (all of it when smaller)."""
    h = h or hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read())
    return h.hexdigest()


def path_identity(name: str | None, revision: str | None = None) -> str | None:
    """`local:<sha256>` of a local file, or of a model folder's top-level model files (names, sizes, sampled bytes), or
    `hub:<id>@<revision>` for anything that is not on this machine. None stays None."""
    if not name:
        return name
    path = Path(name).expanduser()
    if not path.exists():
        return f"hub:{name}@{revision or 'default'}"
    h = hashlib.sha256()
    if path.is_file():
        return "local:" + file_fingerprint(path, h)
    for p in sorted(path.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_SUFFIXES:
            h.update(p.name.encode() + b"\0")
            file_fingerprint(p, h)
    return "local:" + h.hexdigest()
