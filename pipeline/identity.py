"""What a path names, independent of how it was typed: resume compares these, never the strings the user typed.

`../fx/teacher`, `/abs/fx/teacher` and `teacher` typed from another working directory are one model; a resume must not
refuse them. Used by `pipeline.precompute` (the teacher in the capture settings) and `trainer.train` (student, student
config and online teacher of a run). Imports no torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SAMPLE_BYTES = 1 << 16  # hashed from the start and the end of each file: cheap for 100 GB of weights


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
    """`local:<sha256>` of a local file or folder's contents (relative names, sizes, sampled bytes; hidden entries
    skipped), or `hub:<id>@<revision>` for anything that is not on this machine. None stays None."""
    if not name:
        return name
    path = Path(name).expanduser()
    if not path.exists():
        return f"hub:{name}@{revision or 'default'}"
    h = hashlib.sha256()
    if path.is_file():
        return "local:" + file_fingerprint(path, h)
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in sorted(f for f in files if not f.startswith(".")):
            p = Path(root, fname)
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            file_fingerprint(p, h)
    return "local:" + h.hexdigest()
