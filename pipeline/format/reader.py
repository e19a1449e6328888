"""Reader API shared by stage two and by `inspect`/`verify`: open a dataset folder (or fsspec URL) and view its shards.

`open_dataset(path)` trusts only the manifest: a shard file that is not listed there does not exist. Shards are read lazily;
local Arrow files are memory-mapped so every column is a zero-copy numpy view; hidden states stay in Zarr until sliced.
A dataset may come from someone else: the whole manifest is checked when it is opened (format.manifest: types, ranges,
paths that stay inside the folder, sizes against the files), the tokenizer folder against its checksums
(format.tokenizer_files), each file's type and size before it is opened (no symlink, FIFO or device), and Zarr
metadata key by key before zarr parses it (format.zarr_meta). Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property

import numpy as np
import pyarrow as pa

from ..common.errors import FormatError, UserError
from .encode import decode_sampled, decode_topk
from ..common.files import check_plain, walk_plain
from .files import HASH_BLOCK
from .manifest import parse_manifest
from .remote import open_fs
from .schema import MANIFEST, SHARDS_DIR, TARGET_COLUMNS, schema_description
from .sections import Capture, Manifest, ShardRecord
from .tokenizer_files import check_tokenizer_files
from .zarr_meta import ZARR_V2_FILES, check_array_meta, check_group_meta, zarr_filesystem


def _list_lengths(arr: pa.ListArray) -> np.ndarray:
    """(R,) int64: the number of entries of each row of a list column."""
    return np.diff(arr.offsets.to_numpy()).astype(np.int64)


class Shard:
    """One shard: its manifest record, its columns as numpy views, its hidden states as zarr arrays.

    The record was checked with the whole manifest when the dataset was opened (names, sizes, file list). The Arrow table
    is read on first use and kept while the view lives (`Dataset.open_shard` gives a view of one's own).
    """

    def __init__(self, dataset: "Dataset", record: ShardRecord):
        self.dataset, self.record = dataset, record
        self.name = record.name
        self.windows = record.windows
        self.files = record.files  # relative path -> FileMeta(sha256, bytes)
        self._zarr_checked = False

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, windows={self.windows})"

    def where(self, rel: str) -> str:
        """The user-facing path of one of this shard's files, for messages."""
        return f"{self.dataset.url}/{SHARDS_DIR}/{rel}"

    def check_file(self, rel: str) -> str:
        """Path of a listed file after refusing a symlink or special file and a size other than the manifest's,
        before anything opens it (a FIFO or /dev/zero would hang a reader)."""
        path = f"{self.dataset.root}/{SHARDS_DIR}/{rel}"
        try:
            if self.dataset.is_local:
                check_plain(self.dataset.root, f"{SHARDS_DIR}/{rel}", kind="file")
            size = self.dataset.fs.size(path)
        except FileNotFoundError:
            raise FormatError(f"{self.where(rel)}: listed in the manifest but missing; re-copy the dataset")
        except FormatError as e:
            raise FormatError(f"shard {self.name}: {e}")
        expected = self.files[rel].bytes
        if size != expected:
            raise FormatError(f"{self.where(rel)}: has {size} bytes but the manifest says {expected}; the file was altered "
                              "or damaged: re-copy the dataset or rerun precompute")
        return path

    def _open_stream(self, header_only: bool = False):
        """The shard's Arrow stream reader, after checking the file (type, size) and its schema against the manifest."""
        rel = f"{self.name}.arrow"
        path = self.check_file(rel)
        try:
            if self.dataset.is_local:
                source = pa.memory_map(path, "r")
            elif header_only:
                source = self.dataset.fs.open(path, "rb")
            else:
                with self.dataset.fs.open(path, "rb") as f:
                    source = pa.BufferReader(f.read())
            reader = pa.ipc.open_stream(source)
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"{self.where(rel)}: cannot read it as an Arrow stream ({' '.join(str(e).split())[:200]}); "
                              "the file was altered or damaged: re-copy the dataset")
        found = schema_description(reader.schema)
        expected = self.dataset.manifest.schema
        if found != expected:  # checked before reading any row
            diff = sorted(set(found.items()) ^ set(expected.items()))[:4]
            raise FormatError(f"{self.where(rel)}: columns differ from the manifest schema (differences: {diff}); the "
                              "dataset was not written by distill or was altered: do not use it")
        return reader

    def check_schema(self) -> None:
        """Check the Arrow file's type, size and schema without reading its rows (what `inspect` does per shard)."""
        self._open_stream(header_only=True)

    @cached_property
    def table(self) -> pa.Table:
        rel = f"{self.name}.arrow"
        reader = self._open_stream()
        try:
            table = reader.read_all()
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"{self.where(rel)}: cannot read it as an Arrow stream ({' '.join(str(e).split())[:200]}); "
                              "the file was altered or damaged: re-copy the dataset")
        if table.num_rows != self.windows:
            raise FormatError(f"{self.where(rel)}: holds {table.num_rows} windows but the manifest says {self.windows}")
        return table

    def _rows_count(self, rows) -> int:
        return self.windows if rows is None else len(range(self.windows)[rows]) if isinstance(rows, slice) else len(rows)

    def stored_mask(self, rows=None) -> np.ndarray:
        """(R, T) bool: the positions whose targets (and hidden states) the dataset stores: where loss_mask is 1 when
        `capture.positions` is "trained", else every position."""
        if self.dataset.capture.trained_only:
            return self.column("loss_mask", rows).astype(bool)
        return np.ones((self._rows_count(rows), self.dataset.seq_len), bool)

    def stored_counts(self, name: str, rows=None) -> np.ndarray:
        """(R,) entries per window of a target column stored only at trained positions (its list lengths)."""
        return _list_lengths(self._select(self.table.column(name).combine_chunks(), rows))

    def _select(self, arr, rows):
        if rows is not None:
            arr = arr[rows] if isinstance(rows, slice) else arr.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return arr

    def _scatter(self, name: str, rows) -> np.ndarray:
        """A target column stored only at trained positions, back at its positions: (R, T[, ...]) with 0 elsewhere.

        Row w of the column lists the values of window w's trained positions in position order; their number must be
        the window's count of loss_mask 1 (a dataset where it is not is refused, naming the column and window)."""
        arr = self._select(self.table.column(name).combine_chunks(), rows)
        keep = self.column("loss_mask", rows).astype(bool)  # (R, T)
        lengths = _list_lengths(arr)
        want = keep.sum(1)
        bad = lengths != want
        if bad.any():
            r = int(np.argmax(bad))
            w = r if rows is None else int(np.arange(self.windows)[rows][r])
            raise FormatError(f"{self.where(self.name + '.arrow')}: column {name}: window {w} holds {int(lengths[r])} "
                              f"entries but its loss_mask marks {int(want[r])} trained positions (targets are stored "
                              "once per trained position); the dataset was written wrong or altered: do not use it")
        values = arr.flatten()  # the entries of the selected rows (offsets respected)
        shape = [len(values)]
        while pa.types.is_fixed_size_list(values.type):
            shape.append(values.type.list_size)
            values = values.flatten()
        flat = values.to_numpy(zero_copy_only=False).reshape(shape)  # (P, ...)
        out = np.zeros(keep.shape + tuple(shape[1:]), flat.dtype)
        out[keep] = flat
        return out

    def column(self, name: str, rows=None):
        """A column for all rows (or the selected `rows`, an index array or slice).

        `position_ids` of a version-1 dataset (which has no such column) are 0..T-1 in every window, as they were
        captured. Fixed-size columns come back as numpy arrays shaped (windows,), (windows, T) or (windows, T, K), zero-copy when
        local and unselected; variable-length lists as a list of 1-D numpy arrays (one per window); binaries as bytes.
        A target column stored only at trained positions (`capture.positions` "trained") comes back at its positions,
        (windows, T[, K]), with 0 where loss_mask is 0.
        """
        if name == "position_ids" and name not in self.table.column_names and self.dataset.manifest.format_version < 2:
            n = self._rows_count(rows)
            return np.broadcast_to(np.arange(self.dataset.seq_len, dtype=np.int32), (n, self.dataset.seq_len))  # version 1
        if name not in self.table.column_names:
            raise KeyError(f"shard {self.name} has no column {name!r}; it has {self.table.column_names}")
        if name in TARGET_COLUMNS and self.dataset.capture.trained_only:
            return self._scatter(name, rows)
        arr = self._select(self.table.column(name).combine_chunks(), rows)
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
        dataset's first target kind. Where a dataset stores targets only at trained positions, the other positions read
        as id 0 with log-prob 0 in slot 0 and -inf in the rest (a distribution certain of id 0; nothing learns from it).
        """
        kinds = self.dataset.target_kinds
        kind = kind or kinds[0]
        if kind not in kinds:
            raise FormatError(f"dataset holds {' and '.join(kinds) or 'no'} targets, not {kind!r}; pick one of {kinds}")
        col = lambda name: self.column(name, rows)
        cap, T = self.dataset.capture, self.dataset.seq_len
        keep = self.stored_mask(rows) if cap.trained_only else None  # (R, T): the positions that hold targets
        if kind == "sampled":
            ids, lp = decode_sampled(col, cap, T)
        else:
            ids, lp = decode_topk(col, cap, T, keep)
        if keep is not None:  # positions without targets read as certain of id 0 (a distribution; loss_mask 0 there)
            ids[~keep] = 0
            lp[~keep] = -np.inf
            lp[~keep, 0] = 0.0
        return ids, lp

    def log_norm(self, temperature: float, rows=None) -> np.ndarray | None:
        """(R, T) float32: the teacher's log sum_v p_v^(1/T) at `temperature` per position, for exact tempering of the
        stored top-k (0 at T = 1); None when the capture did not store that temperature (`capture.log_norm_temperatures`)."""
        if temperature == 1:
            return np.zeros((self._rows_count(rows), self.dataset.seq_len), np.float32)
        temps = self.dataset.capture.log_norm_temperatures
        if float(temperature) not in temps:
            return None
        return np.array(self.column("log_norm", rows)[..., temps.index(float(temperature))], np.float32)  # a copy: writable

    def check_zarr(self) -> None:
        """Refuse a Zarr folder that holds a symlink, a special file, a file the manifest does not list or Zarr v2
        metadata, and check the group's and every layer's zarr.json, before zarr opens anything."""
        if self._zarr_checked:
            return
        prefix = f"{self.name}.zarr/"
        listed = {rel[len(prefix):] for rel in self.files if rel.startswith(prefix)}
        for rel in sorted(listed):
            if rel.rsplit("/", 1)[-1] in ZARR_V2_FILES:
                raise FormatError(f"{self.where(prefix + rel)}: Zarr v2 metadata; format version 1 stores Zarr v3 only "
                                  "(the dataset was not written by distill or was altered: do not use it)")
        if self.dataset.is_local:
            try:
                present = walk_plain(check_plain(self.dataset.root, f"{SHARDS_DIR}/{self.name}.zarr", kind="dir"))
            except FormatError as e:
                raise FormatError(f"shard {self.name}: {e}")
            extra = sorted(set(present) - listed)
            if extra:
                raise FormatError(f"{self.where(prefix + extra[0])}: not listed in the manifest, yet zarr could read it; "
                                  "the dataset was altered: re-copy it")
        check_group_meta(self._json(prefix + "zarr.json"), self.where(prefix + "zarr.json"))
        T = self.dataset.seq_len
        for x in self.dataset.capture.hidden_layers:
            rel = f"{prefix}layer_{x.index}/zarr.json"
            if rel not in self.files:
                raise FormatError(f"shard {self.name}: the manifest lists no {rel} although layer {x.index} was captured")
            bound = T * (self.dataset.capture.batch_size or 1) if self.dataset.capture.trained_only else 0
            check_array_meta(self._json(rel), self.where(rel), (self.hidden_rows_count(), x.width), max_chunk_rows=bound)
        self._zarr_checked = True

    def _json(self, rel: str):
        path = self.check_file(rel)
        with self.dataset.fs.open(path, "rb") as f:
            raw = f.read()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise FormatError(f"{self.where(rel)}: not valid JSON ({e}); re-copy the dataset")

    def hidden_rows_count(self) -> int:
        """Rows of each hidden-state array: windows * T, or the shard's trained positions (`capture.positions` "trained")."""
        if self.dataset.capture.trained_only:
            return int(self.record.valid_tokens or 0)
        return self.windows * self.dataset.seq_len

    @cached_property
    def _hidden_starts(self) -> np.ndarray:
        """(W + 1,) first hidden-state row of each window when only trained positions are stored."""
        return np.concatenate([[0], np.cumsum(self.column("loss_mask").astype(bool).sum(1))]).astype(np.int64)

    def hidden_windows(self, layer: int, rows, arr=None) -> np.ndarray:
        """Hidden states of `layer` for the shard's `rows` (an index array) at their positions: (R, T, H) float16, 0 at
        positions a "trained" dataset does not store. Row r of the array is position t of window w for the r-th stored
        position in (window, position) order: windows * T + t with every position stored, else the trained ones."""
        arr, T = self.hidden(layer) if arr is None else arr, self.dataset.seq_len  # arr: that layer's open array
        rows = np.asarray(rows, dtype=np.int64)
        if not self.dataset.capture.trained_only:
            if len(rows) == 0:
                return np.zeros((0, T, arr.shape[1]), np.float16)
            return np.stack([arr[r * T : (r + 1) * T] for r in rows.tolist()])
        start = self._hidden_starts
        keep = self.column("loss_mask", rows).astype(bool)  # (R, T)
        out = np.zeros((len(rows), T, arr.shape[1]), np.float16)
        for i, r in enumerate(rows.tolist()):
            out[i][keep[i]] = arr[int(start[r]) : int(start[r + 1])]
        return out

    def hidden(self, layer: int):
        """Hidden states of `layer` (an index into the teacher's hidden_states) as a lazy zarr array (tokens, hidden)."""
        import zarr

        layers = self.dataset.hidden_layers
        if layer not in layers:
            raise FormatError(f"dataset has no hidden states for layer {layer}; stored layers: {layers}")
        self.check_zarr()
        base = f"{self.dataset.root}/{SHARDS_DIR}/{self.name}.zarr/layer_{layer}"
        if self.dataset.is_local:
            store = base
        else:  # a filesystem made for zarr's event loop, never the dataset's own (see zarr_filesystem)
            store = zarr.storage.FsspecStore(zarr_filesystem(self.dataset.fs), path=base, read_only=True)
        try:
            return zarr.open_array(store, mode="r", zarr_format=3)
        except Exception as e:  # metadata was checked above; anything zarr still refuses is a damaged file
            raise FormatError(f"{self.where(f'{self.name}.zarr/layer_{layer}')}: zarr cannot open it ({' '.join(str(e).split())[:200]})")

    def verify_checksums(self, hidden: bool = True) -> None:
        """Recompute the sha256 of every file of this shard (the Zarr files only when `hidden`); raise FormatError
        naming the first mismatch. Each file's type and size are checked before it is opened."""
        for rel, meta in self.files.items():
            if not hidden and ".zarr/" in rel:
                continue
            path = self.check_file(rel)
            h = hashlib.sha256()
            with self.dataset.fs.open(path, "rb") as f:
                while block := f.read(HASH_BLOCK):
                    h.update(block)
            if h.hexdigest() != meta.sha256:
                raise FormatError(
                    f"shard {self.name}: checksum mismatch in {rel} (manifest {meta.sha256[:12]}…, file {h.hexdigest()[:12]}…); "
                    "the file was altered or damaged: re-copy the dataset or rerun precompute"
                )


class Dataset:
    """An opened dataset: the manifest (checked whole, see format.manifest), its tokenizer files (checked), its shards."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        self.fs, self.root = open_fs(self.url, storage_options)  # credentials from the standard places (format/remote.py)
        self.cache = None  # a ShardCache for a remote dataset (open_dataset attaches it): open_shard reads local copies
        self.root = self.root.rstrip("/") or "/"
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        where = f"{self.url}/{MANIFEST}"
        if self.is_local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise FormatError(f"{self.url} is a file, not a dataset folder; pass the folder that holds {MANIFEST}")
            if not os.path.lexists(f"{self.root}/{MANIFEST}"):
                raise FormatError(
                    f"{self.url} has no {MANIFEST}: not a distill dataset, or its precompute has not finished "
                    "(rerun the same `distill precompute` command to resume it)"
                )
            check_plain(self.root, MANIFEST, kind="file")
            check_plain(self.root, SHARDS_DIR, kind="dir")
        try:
            with self.fs.open(f"{self.root}/{MANIFEST}", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise FormatError(
                f"{self.url} has no {MANIFEST}: not a distill dataset, or its precompute has not finished "
                "(rerun the same `distill precompute` command to resume it)"
            )
        except OSError as e:
            raise FormatError(f"{where}: cannot read it ({e})")
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            parsed = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"{where}: not valid JSON ({e}); re-copy the dataset")
        self.manifest: Manifest = parse_manifest(parsed, where)
        self.shards = [Shard(self, r) for r in self.manifest.shards]
        starts = np.cumsum([0] + [s.windows for s in self.shards])
        self.window_starts = [int(x) for x in starts[:-1]]  # global index of each shard's first window
        check_tokenizer_files(self)

    def __repr__(self) -> str:
        return f"Dataset({self.url!r}, shards={len(self.shards)}, windows={self.windows})"

    @property
    def capture(self) -> Capture:
        return self.manifest.capture

    @property
    def seq_len(self) -> int:
        return self.manifest.corpus.seq_len

    @property
    def top_k(self) -> int:
        return self.capture.top_k

    @property
    def target_kinds(self) -> list[str]:
        return list(self.capture.targets)

    @property
    def vocab_size(self) -> int:
        return self.manifest.teacher.vocab_size

    @property
    def hidden_layers(self) -> list[int]:
        return self.capture.hidden_indices

    @property
    def windows(self) -> int:
        return sum(s.windows for s in self.shards)

    def open_shard(self, i: int) -> Shard:
        """A view of shard i of its own, not `self.shards[i]`: its table (in memory for a remote dataset) is read on
        first use and freed with the view. For readers that keep only a few shards open at a time."""
        if self.cache is not None:
            return self.cache.open(i)
        return Shard(self, self.manifest.shards[i])


def open_dataset(url, storage_options: dict | None = None, cache_dir=None, cache_gb: float | None = None) -> Dataset:
    """Open a dataset folder or fsspec URL (file://, memory://, s3://…) written by `distill precompute`."""
    ds = Dataset(str(url), storage_options)
    in_memory = "memory" in (ds.fs.protocol if isinstance(ds.fs.protocol, tuple) else (ds.fs.protocol,))
    if not ds.is_local and not in_memory:  # remote shards: fetched ahead into a bounded local cache (format/cache.py);
        # an in-process memory:// filesystem gains nothing from a copy on disk
        from .cache import DEFAULT_CACHE_GB, ShardCache
        from .remote import cache_home

        from .remote import looks_like_url, redact

        if cache_dir is not None and looks_like_url(cache_dir):
            raise UserError(f"--cache-dir {redact(cache_dir)} is a URL; the cache is a local folder: pass a local path")
        gb = DEFAULT_CACHE_GB if cache_gb is None else cache_gb
        if gb <= 0:
            raise UserError(f"--cache-gb is {gb}; expected a positive size in GB")
        ds.cache = ShardCache(ds, cache_dir or cache_home() / "shards", int(gb * 1e9))
    return ds
