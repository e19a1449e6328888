"""Reader API shared by stage two and by `inspect`/`verify`: open a dataset folder (or fsspec URL) and view its shards.

`open_dataset(path)` trusts only the manifest: a shard file that is not listed there does not exist. Shards are read lazily;
local Arrow files are memory-mapped so every column is a zero-copy numpy view; hidden states stay in Zarr until sliced.
A dataset may come from someone else: manifest paths are checked to stay inside the folder and Zarr metadata is checked
against a codec allowlist before zarr parses it. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

import fsspec
import numpy as np
import pyarrow as pa

from ..errors import FormatError
from .encode import decode_sampled, decode_topk
from .files import HASH_BLOCK, safe_relpath
from .schema import FORMAT_NAME, FORMAT_VERSION, MANIFEST, SHARDS_DIR

# Codecs a hidden-state array may use. Anything else (e.g. a pickle-based numcodecs codec) is refused unread.
ALLOWED_ZARR_CODECS = {"bytes", "zstd", "sharding_indexed", "crc32c", "transpose", "gzip", "blosc"}


def _check_codecs(codecs: list, where: str) -> None:
    for codec in codecs or []:
        name = codec.get("name") if isinstance(codec, dict) else None
        if name not in ALLOWED_ZARR_CODECS:
            raise FormatError(
                f"{where} uses zarr codec {name!r}; allowed: {', '.join(sorted(ALLOWED_ZARR_CODECS))}. "
                "The dataset was not written by distill or was altered: do not use it"
            )
        if name == "sharding_indexed":
            conf = codec.get("configuration", {})
            _check_codecs(conf.get("codecs", []), where)
            _check_codecs(conf.get("index_codecs", []), where)


class Shard:
    """One shard: its manifest record, its columns as numpy views, its hidden states as zarr arrays."""

    def __init__(self, dataset: "Dataset", record: dict):
        self.dataset, self.record = dataset, record
        self.name = safe_relpath(record["name"], "shard")
        self.windows = int(record["windows"])
        self.files = record["files"]
        for rel in self.files:
            safe_relpath(rel, "shard file")

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, windows={self.windows})"

    @cached_property
    def table(self) -> pa.Table:
        path = f"{self.dataset.root}/{SHARDS_DIR}/{self.name}.arrow"
        try:
            if self.dataset.is_local:
                source = pa.memory_map(path, "r")
            else:
                with self.dataset.fs.open(path, "rb") as f:
                    source = pa.BufferReader(f.read())
            table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise FormatError(f"shard {self.name}: cannot read {self.name}.arrow ({e}); run `distill verify` on the dataset")
        if table.num_rows != self.windows:
            raise FormatError(f"shard {self.name} holds {table.num_rows} windows but the manifest says {self.windows}")
        return table

    def column(self, name: str, rows=None):
        """A column for all rows (or the selected `rows`, an index array or slice).

        Fixed-size columns come back as numpy arrays shaped (windows,), (windows, T) or (windows, T, K), zero-copy when
        local and unselected; variable-length lists as a list of 1-D numpy arrays (one per window); binaries as bytes.
        """
        if name not in self.table.column_names:
            raise KeyError(f"shard {self.name} has no column {name!r}; it has {self.table.column_names}")
        arr = self.table.column(name).combine_chunks()
        if rows is not None:
            arr = arr[rows] if isinstance(rows, slice) else arr.take(pa.array(np.asarray(rows, dtype=np.int64)))
        if pa.types.is_list(arr.type):
            offsets = arr.offsets.to_numpy()
            values = arr.values.to_numpy(zero_copy_only=False)
            return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]
        if pa.types.is_binary(arr.type):
            return arr.to_pylist()
        shape = [len(arr)]
        while pa.types.is_fixed_size_list(arr.type):
            shape.append(arr.type.list_size)
            arr = arr.flatten()
        return arr.to_numpy(zero_copy_only=False).reshape(shape)

    def sparse_targets(self, kind: str | None = None, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Stored teacher targets decoded from either encoding: ids (R, T, M) int64 and log-probs (R, T, M) float32.

        kind: "topk" (exact head log-probs over the full vocabulary; tail = 1 - sum) or "sampled" (log of count / N,
        plus the log importance weight when sampled at a temperature other than 1; padded slots -inf). Default: the
        dataset's first target kind.
        """
        kinds = self.dataset.target_kinds
        kind = kind or kinds[0]
        if kind not in kinds:
            raise FormatError(f"dataset holds {' and '.join(kinds) or 'no'} targets, not {kind!r}; pick one of {kinds}")
        col = lambda name: self.column(name, rows)  # noqa: E731
        decode = decode_topk if kind == "topk" else decode_sampled
        return decode(col, self.dataset.capture, self.dataset.seq_len)

    def hidden(self, layer: int):
        """Hidden states of `layer` (an index into the teacher's hidden_states) as a lazy zarr array (tokens, hidden)."""
        import zarr

        layers = self.dataset.hidden_layers
        if layer not in layers:
            raise FormatError(f"dataset has no hidden states for layer {layer}; stored layers: {layers}")
        base = f"{self.dataset.root}/{SHARDS_DIR}/{self.name}.zarr/layer_{layer}"
        with self.dataset.fs.open(f"{base}/zarr.json", "rb") as f:
            meta = json.loads(f.read())
        _check_codecs(meta.get("codecs", []), f"shard {self.name} layer {layer}")
        store = zarr.storage.FsspecStore(self.dataset.fs, path=base, read_only=True) if not self.dataset.is_local else base
        arr = zarr.open_array(store, mode="r", zarr_format=3)
        if arr.shape[0] != self.windows * self.dataset.seq_len:
            raise FormatError(f"shard {self.name} layer {layer} has {arr.shape[0]} tokens, expected {self.windows * self.dataset.seq_len}")
        return arr

    def verify_checksums(self, hidden: bool = True) -> None:
        """Recompute the sha256 of every file of this shard (the Zarr files only when `hidden`); raise FormatError
        naming the first mismatch."""
        for rel, meta in self.files.items():
            if not hidden and ".zarr/" in rel:
                continue
            path = f"{self.dataset.root}/{SHARDS_DIR}/{rel}"
            h = hashlib.sha256()
            try:
                with self.dataset.fs.open(path, "rb") as f:
                    while block := f.read(HASH_BLOCK):
                        h.update(block)
            except FileNotFoundError:
                raise FormatError(f"shard {self.name}: file {rel} listed in the manifest is missing; re-copy the dataset")
            if h.hexdigest() != meta["sha256"]:
                raise FormatError(
                    f"shard {self.name}: checksum mismatch in {rel} (manifest {meta['sha256'][:12]}…, file {h.hexdigest()[:12]}…); "
                    "the file was altered or damaged: re-copy the dataset or rerun precompute"
                )


class Dataset:
    """An opened dataset: the manifest and its shards."""

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        try:
            with self.fs.open(f"{self.root}/{MANIFEST}", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise FormatError(
                f"{self.url} has no {MANIFEST}: not a distill dataset, or its precompute has not finished "
                "(rerun the same `distill precompute` command to resume it)"
            )
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.manifest = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"{self.url}/{MANIFEST} is not valid JSON ({e})")
        m = self.manifest
        if m.get("format") != FORMAT_NAME:
            raise FormatError(f"{self.url}: manifest format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
        version = m.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FormatError(
                f"{self.url}: dataset format version {version} is newer than this distill understands ({FORMAT_VERSION}); "
                "upgrade offline-distill"
            )
        self.shards = [Shard(self, r) for r in m["shards"]]

    def __repr__(self) -> str:
        return f"Dataset({self.url!r}, shards={len(self.shards)}, windows={self.windows})"

    @property
    def capture(self) -> dict:
        return self.manifest["capture"]

    @property
    def seq_len(self) -> int:
        return int(self.manifest["corpus"]["seq_len"])

    @property
    def top_k(self) -> int:
        return int(self.capture.get("top_k", 0))

    @property
    def target_kinds(self) -> list[str]:
        return list(self.capture.get("targets", []))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["teacher"]["vocab_size"])

    @property
    def hidden_layers(self) -> list[int]:
        return [int(x["index"]) for x in self.capture.get("hidden_layers", [])]

    @property
    def windows(self) -> int:
        return sum(s.windows for s in self.shards)

    def shard(self, i: int) -> Shard:
        return self.shards[i]


def open_dataset(url) -> Dataset:
    """Open a dataset folder or fsspec URL (file://, memory://, s3://…) written by `distill precompute`."""
    return Dataset(str(url))
