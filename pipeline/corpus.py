"""Corpus → documents → a token file → windows. The first stage of the capture, called by `pipeline.precompute`.

Documents are read through Hugging Face `datasets` in streaming mode, so the corpus is never held in memory. The token
stream is written once to a flat file (2-4 bytes per token, tiny beside the targets), which makes the number of windows
known up front (exact progress, ETA and shard plan) and lets resume and other ranks index windows without re-tokenizing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .common.errors import UserError, describe
from .common.identity import file_fingerprint

# Extensions read as datasets (rows of a text column); any other file in a folder is one document.
DATA_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class CorpusStats:
    documents: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # the first few skipped files, for the message


def list_data_files(paths: list[str]) -> list[Path]:
    """Expand files and folders into a sorted file list (hidden files and folders skipped)."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(f"--data {p}: no such file or folder; pass an existing corpus file or folder")
        if path.is_file():
            files.append(path)
            continue
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(root, n) for n in sorted(names) if not n.startswith(".")]
        if not found:
            raise UserError(f"--data {p}: the folder holds no files; the corpus is empty")
        files += found
    return files


def corpus_fingerprint(files: list[Path]) -> str:
    """Identity of the input files: name, size, and the sha256 of their first and last 64 KiB.

    Cheap for a terabyte corpus, yet catches a changed or swapped file in nearly every case. Names are resolved real
    paths, so the same corpus typed relative, absolute or from another working directory has one fingerprint.
    """
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.realpath(f)}\0".encode())
        file_fingerprint(f, h)  # size, first and last 64 KiB
    return h.hexdigest()


def _dataset_rows(path: Path, text_column: str) -> Iterator[str]:
    import datasets

    builder = DATA_BUILDERS[path.suffix.lower()]
    if path.stat().st_size == 0:  # no rows; `datasets` fails on it with an exception whose message is empty
        return
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **kwargs)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # datasets wraps parse errors in many types; the message is what the user needs
        raise UserError(f"--data {path}: cannot read it as {builder} ({describe(e)})")
    if first is None:
        return
    column = "text" if builder == "text" else text_column
    if column not in first:
        raise UserError(
            f"--data {path}: no column {column!r}; it has {sorted(first)}; pass --text-column with one of them"
        )
    yield first[column]
    for row in it:
        yield row[column]


def iter_documents(files: list[Path], text_column: str, stats: CorpusStats) -> Iterator[str]:
    """Yield documents in a fixed order. A .txt file is one document (its lines streamed and joined); undecodable
    source files are skipped and counted in `stats`."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            # Lines are streamed; the file is still one document (EOS only at its end).
            text = "".join(line or "" for line in _dataset_rows(path, text_column))
            if text:
                stats.documents += 1
                yield text
        elif suffix in DATA_BUILDERS:
            for text in _dataset_rows(path, text_column):
                if text:
                    stats.documents += 1
                    yield text
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, ValueError):
                stats.skipped += 1
                if len(stats.skipped_examples) < 5:
                    stats.skipped_examples.append(str(path))
                continue
            if text:
                stats.documents += 1
                yield text


def tokenize_to_file(
    docs: Iterator[str], tokenizer, eos_id: int, out_path: Path, dtype: str, max_tokens: int | None, batch_docs: int = 64, progress=None
) -> int:
    """Tokenize documents (EOS after each) into a flat binary file of `dtype`; return the token count.

    Stops at `max_tokens + 1` tokens: the extra token is the label of the last position.
    """
    limit = None if max_tokens is None else max_tokens + 1
    total = 0
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        batch: list[str] = []

        def flush() -> bool:
            nonlocal total
            enc = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]  # windows come later: no length warning
            for ids in enc:
                ids = np.asarray(ids + [eos_id], dtype=dtype)
                if limit is not None and total + len(ids) >= limit:
                    ids = ids[: limit - total]
                f.write(ids.tobytes())
                total += len(ids)
                if progress:
                    progress(len(ids))
                if limit is not None and total >= limit:
                    return True
            batch.clear()
            return False

        for doc in docs:
            batch.append(doc)
            if len(batch) >= batch_docs and flush():
                break
        else:
            if batch:
                flush()
    os.replace(tmp, out_path)
    return total


def count_windows(n_tokens: int, seq_len: int) -> int:
    """Windows needed so every position with a next token is covered once."""
    return max(0, -(-(n_tokens - 1) // seq_len))


def make_windows(tokens: np.ndarray, first: int, count: int, seq_len: int, pad_id: int):
    """Windows `first .. first+count-1` of the packed stream.

    Window w holds input tokens [w*T, w*T+T) and labels [w*T+1, w*T+T+1); past the end of the stream inputs are padded
    with `pad_id` and the loss mask is 0.
    Returns input_ids (B, T), labels (B, T), loss_mask (B, T) uint8.
    """
    n = len(tokens)
    starts = (first + np.arange(count)) * seq_len  # (B,)
    pos = starts[:, None] + np.arange(seq_len)[None, :]  # (B, T)
    input_ids = np.where(pos < n, tokens[np.minimum(pos, n - 1)], pad_id).astype(tokens.dtype)
    labels = np.where(pos + 1 < n, tokens[np.minimum(pos + 1, n - 1)], pad_id).astype(tokens.dtype)
    loss_mask = (pos + 1 < n).astype(np.uint8)
    return input_ids, labels, loss_mask
