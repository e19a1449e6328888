"""`--data` inputs → examples. The capture's first stage for text, chat and prompt-completion data.

Called by `pipeline.precompute`; the examples go on to `pipeline.chat.tokenize_example`. A `--data` value is one of:

- a local file or folder, read as `pipeline.corpus` reads it: .jsonl/.json/.parquet/.arrow files are rows, .txt and
  any other file in a folder one text document;
- a Hugging Face dataset: a local dataset folder (written by `save_to_disk`, or holding `dataset_infos.json` or a
  dataset card `README.md` whose YAML header declares `configs:` or `dataset_info:`) or a hub id such as `org/name`, read
  with `datasets` in streaming mode (`--data-split`, `--data-config`);
- an fsspec URL of files (`s3://`, `gs://`, `hf://`, `file://`, ...; globs allowed), read by extension.

Every row becomes a normalized example, following TRL's dataset conventions:
`{"format": "text", "text": str}`, `{"format": "chat", "messages": [{"role", "content"}, ...]}` or
`{"format": "prompt-completion", "prompt": str | messages, "completion": str | messages}`. The format is detected per
source from its columns (`messages`; `prompt` and `completion`; the text column) or forced with `--format`.
Sources are read one after another in the order given, so the example order (and the capture) is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .common.errors import UserError, describe
from .corpus import DATA_BUILDERS, corpus_fingerprint, list_data_files

FORMATS = ("auto", "text", "chat", "prompt-completion")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATASET_FOLDER_MARKERS = ("state.json", "dataset_dict.json", "dataset_infos.json")


@dataclass
class SourceStats:
    """Counts per format, for the manifest and the summary."""

    examples: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # undecodable files
    skipped_examples: list[str] = field(default_factory=list)


def source_kind(spec: str) -> str:
    """`file`, `folder` (a corpus folder walked as today), `dataset_folder`, `url` or `hub`."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec):
        return "url"
    path = Path(spec)
    if path.is_file():
        return "file"
    if path.is_dir():
        return "dataset_folder" if is_dataset_folder(path) else "folder"
    if HUB_ID.match(spec) and not spec.startswith((".", "/")) and "/" in spec:
        return "hub"
    raise UserError(f"--data {spec}: no such file or folder, and not a URL or a hub dataset id (org/name); pass an "
                    "existing path, a URL such as s3://bucket/data/*.jsonl, or a dataset id")


def is_dataset_folder(path: Path) -> bool:
    """A folder `datasets` should load (rather than a corpus folder walked file by file, as before)."""
    if any((path / m).is_file() for m in DATASET_FOLDER_MARKERS):
        return True
    card = path / "README.md"
    if not card.is_file():
        return False
    head = card.read_text(encoding="utf-8", errors="replace")[:20000]
    if not head.startswith("---"):
        return False
    yaml = head.split("\n---", 1)[0]
    return bool(re.search(r"^(configs|dataset_info):", yaml, re.M))


def iter_examples(specs: list[str], fmt: str = "auto", text_column: str = "text", split: str = "train",
                  config: str | None = None, stats: SourceStats | None = None,
                  storage_options: dict | None = None) -> Iterator[dict]:
    """Yield normalized examples from every `--data` value, in order."""
    if fmt not in FORMATS:
        raise UserError(f"--format is {fmt!r}; expected one of {', '.join(FORMATS)}")
    stats = stats if stats is not None else SourceStats()
    for spec in specs:
        for name, rows in _row_sources(spec, text_column, split, config, stats, storage_options):
            detected = None
            for row in rows:
                if detected is None:
                    detected = detect_format(list(row), fmt, text_column, name)
                example = normalize(row, detected, text_column, name)
                if example is not None:
                    stats.examples[detected] = stats.examples.get(detected, 0) + 1
                    yield example


def detect_format(columns: list[str], fmt: str, text_column: str, where: str) -> str:
    """The format of a source from its columns, or the forced one after checking the columns it needs are there."""
    needs = {"chat": ["messages"], "prompt-completion": ["prompt", "completion"], "text": [text_column]}
    if fmt != "auto":
        missing = [c for c in needs[fmt] if c not in columns]
        if missing:
            raise UserError(f"--data {where}: --format {fmt} needs the column(s) {missing}, and the rows have {sorted(columns)}; "
                            f"pass another --format{' or --text-column' if fmt == 'text' else ''}")
        return fmt
    for candidate in ("chat", "prompt-completion", "text"):
        if all(c in columns for c in needs[candidate]):
            return candidate
    raise UserError(f"--data {where}: cannot tell the format from the columns {sorted(columns)}; expected 'messages' "
                    f"(chat), 'prompt' and 'completion' (prompt-completion) or {text_column!r} (text; --text-column names "
                    "another)")


def normalize(row: dict, fmt: str, text_column: str, where: str) -> dict | None:
    """One row → a normalized example (None for an empty text). Checks the shape of messages."""
    if fmt == "text":
        text = row.get(text_column)
        if not isinstance(text, str):
            raise UserError(f"--data {where}: column {text_column!r} holds {type(text).__name__}, expected text")
        return {"format": "text", "text": text} if text else None
    if fmt == "chat":
        return {"format": "chat", "messages": _messages(row.get("messages"), "messages", where)}
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"format": "prompt-completion", "prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        return {"format": "prompt-completion", "prompt": _messages(prompt, "prompt", where),
                "completion": _messages(completion, "completion", where)}
    raise UserError(f"--data {where}: 'prompt' is {type(prompt).__name__} and 'completion' {type(completion).__name__}; "
                    "expected both strings or both lists of {role, content} messages")


def _messages(value, column: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"--data {where}: column {column!r} holds {type(value).__name__}, expected a non-empty list of "
                        "{role, content} messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            shown = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise UserError(f"--data {where}: a message in {column!r} is {shown}, expected {{'role': str, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# --- reading ----------------------------------------------------------------------------------------------------------

def _row_sources(spec: str, text_column: str, split: str, config: str | None, stats: SourceStats,
                 storage_options: dict | None) -> Iterator[tuple[str, Iterator[dict]]]:
    """(name, rows) per file or dataset of one `--data` value. Documents (.txt, other files) are rows of `text_column`."""
    kind = source_kind(spec)
    if kind in ("file", "folder"):
        for path in list_data_files([spec]):
            yield str(path), _local_rows(path, text_column, stats)
    elif kind == "url":
        yield from _url_sources(spec, text_column, storage_options)
    else:
        yield spec, _dataset_rows(spec, kind, split, config)


def _local_rows(path: Path, text_column: str, stats: SourceStats) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix in DATA_BUILDERS and suffix != ".txt":
        yield from _builder_rows(DATA_BUILDERS[suffix], str(path), str(path), path.stat().st_size == 0)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, ValueError):
        stats.skipped += 1
        if len(stats.skipped_examples) < 5:
            stats.skipped_examples.append(str(path))
        return
    yield {text_column: text}


def _builder_rows(builder: str, data_files: str, where: str, empty: bool = False, storage_options: dict | None = None) -> Iterator[dict]:
    import datasets

    if empty:
        return
    try:
        ds = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True,
                                   **({"storage_options": storage_options} if storage_options else {}))
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # datasets wraps parse errors in many types; the message is what the user needs
        raise UserError(f"--data {where}: cannot read it as {builder} ({describe(e)})")
    if first is None:
        return
    yield first
    yield from it


def _url_sources(url: str, text_column: str, storage_options: dict | None) -> Iterator[tuple[str, Iterator[dict]]]:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(url, storage_options=storage_options or {})
    except Exception as e:
        raise UserError(f"--data {url}: cannot open it ({describe(e)}); check the URL and --storage-options")
    paths = sorted(p for p in paths if fs.isfile(p))
    if not paths:
        raise UserError(f"--data {url}: no files found at that URL")
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    for p in paths:
        full = p if "://" in p else f"{protocol}://{p}"
        yield full, _url_rows(fs, p, full, text_column)


def _url_rows(fs, path: str, where: str, text_column: str) -> Iterator[dict]:
    """Rows of one remote file, streamed: JSON lines and Parquet row groups; any other file is one document."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".jsonl":
            with fs.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                    yield from batch.to_pylist()
        else:
            with fs.open(path, "rb") as f:
                data = f.read()
            if suffix == ".json":
                rows = json.loads(data)
                yield from (rows if isinstance(rows, list) else [rows])
            else:
                yield {text_column: data.decode("utf-8")}
    except (ValueError, OSError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"--data {where}: cannot read it ({describe(e)})")


def _dataset_rows(spec: str, kind: str, split: str, config: str | None) -> Iterator[dict]:
    import datasets

    try:
        if kind == "dataset_folder" and any((Path(spec) / m).is_file() for m in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(spec)  # memory-mapped Arrow; streamed through an iterable view
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"--data {spec}: no split {split!r}; it has {sorted(ds)}; pass --data-split")
                ds = ds[split]
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(spec, config, split=split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except UserError:
        raise
    except Exception as e:
        hint = ("; for a hub id, unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE and log in (huggingface-cli login) if it is "
                "private" if kind == "hub" else "")
        raise UserError(f"--data {spec}: cannot load it as a dataset (split {split!r}, config {config!r}): {describe(e)}{hint}")
    if first is None:
        return
    yield first
    yield from it


def sources_fingerprint(specs: list[str], split: str, config: str | None) -> str:
    """Identity of the inputs, compared on resume: local files as `corpus_fingerprint`; a hub dataset by name, config
    and split (a hub dataset changing under the same name is not detected; pin a revision in the id if it matters)."""
    h = hashlib.sha256()
    for spec in specs:
        kind = source_kind(spec)
        if kind in ("file", "folder", "dataset_folder"):
            h.update(corpus_fingerprint(list_data_files([spec])).encode())
        else:
            h.update(f"{kind}\0{spec}\0{config}\0{split}\0".encode())
    return h.hexdigest()
