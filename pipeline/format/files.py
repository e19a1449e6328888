"""Atomic writes, checksums and safe path resolution for dataset folders.

A dataset may come from someone else, so every path taken from a manifest is resolved here and refused when it would
leave the dataset folder. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ..errors import FormatError

_SAFE_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
HASH_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tmp_name(path: Path) -> Path:
    # The pid keeps two ranks on a shared filesystem from writing the same temp file.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_path(tmp: Path, final: Path) -> None:
    """Rename a finished temp file or folder onto its final name (a stale folder from a crash is removed first)."""
    if final.is_dir() and tmp.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_temp_files(folder: Path, owned=lambda name: True) -> None:
    """Delete leftovers of a killed run (names containing `.tmp-`) for which `owned(name)` holds.

    With several ranks sharing a folder, each removes only its own shards' leftovers: another rank may be writing now.
    """
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if ".tmp-" in p.name and owned(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def safe_relpath(rel: str, what: str) -> str:
    """Check that a relative path from a manifest stays inside the dataset folder (no absolute paths, no `..`)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") or not _SAFE_PART.match(p) for p in parts):
        raise FormatError(
            f"manifest names {what} {rel!r}, which is not a plain relative path inside the dataset folder; "
            "the dataset is corrupt or crafted: do not use it"
        )
    return rel


def list_files(folder: Path) -> list[str]:
    """Every file below `folder` as sorted '/'-separated relative paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            out.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(out)
