"""Checksums and safe path resolution for dataset folders.

A dataset may come from someone else, so every path taken from a manifest is resolved here and refused when it would
leave the dataset folder. Imports no torch. (Atomic writes and the plain-file checks: pipeline.common.files.)
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..common.errors import FormatError

_SAFE_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
HASH_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def safe_relpath(rel: str, what: str) -> str:
    """Check that a relative path from a manifest stays inside the dataset folder (no absolute paths, no `..`)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") or not _SAFE_PART.match(p) for p in parts):
        raise FormatError(
            f"manifest names {what} {rel!r}, which is not a plain relative path inside the dataset folder; "
            "the dataset is corrupt or crafted: do not use it"
        )
    return rel
