"""ShardWriter: writes one shard (an Arrow IPC stream file, plus a Zarr v3 group of hidden states) atomically.

Called by `pipeline.precompute` from its background writer thread. Everything goes under temporary names and is renamed
only when complete, so a killed run never leaves a half shard under a final name. Imports no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..common.files import list_files, replace_path, tmp_name
from .encode import fixed_lists
from .files import sha256_file
from .sections import FileMeta, ShardRecord
from .schema import SHARDS_DIR, shard_name

# Hidden states: one zarr chunk per window keeps partial reads (one window) cheap; one zarr shard per write batch means
# every write fills whole shard files, so zarr never reads back what it wrote.
ZSTD_LEVEL = 3


class ShardWriter:
    """Write `n_windows` rows of a shard in batches, then `finish()` to get its manifest record.

    Use as a context manager: leaving it with an exception deletes the temporary files.
    """

    def __init__(
        self,
        root: Path,
        index: int,
        schema: pa.Schema,
        n_windows: int,
        seq_len: int,
        hidden_widths: dict[int, int] | None = None,
        windows_per_zarr_shard: int = 8,
        compression: str = "none",
        trained_only: bool = False,
    ):
        self.root, self.name, self.schema = Path(root), shard_name(index), schema
        self.n_windows, self.seq_len = n_windows, seq_len
        # Uncompressed by default: a memory-mapped reader then reads columns with no copy and no decode.
        self.ipc_options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
        self.shards_dir = self.root / SHARDS_DIR
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.arrow_path = self.shards_dir / f"{self.name}.arrow"
        self.zarr_path = self.shards_dir / f"{self.name}.zarr"
        self._batches: list[pa.RecordBatch] = []
        self._rows = 0
        self._stats: dict[str, list[float]] = {}
        self._zarr_tmp = None
        self._zarr_arrays = {}
        # trained_only: hidden states of trained positions only (loss_mask 1), appended in (window, position) order.
        # They are buffered and written one whole zarr shard at a time, the array growing as it goes, so zarr never
        # rewrites a shard file; the last, partial one at finish().
        self.trained_only = trained_only
        self._pending: dict[int, list[np.ndarray]] = {}
        self._hidden_rows = 0
        if hidden_widths:
            import zarr
            from zarr.codecs import ZstdCodec

            self._zarr_tmp = tmp_name(self.zarr_path)
            group = zarr.open_group(str(self._zarr_tmp), mode="w", zarr_format=3)
            tokens = 0 if trained_only else n_windows * seq_len
            per_shard = max(1, min(windows_per_zarr_shard, n_windows)) * seq_len
            self._zarr_block = per_shard
            for layer, width in hidden_widths.items():
                self._pending[layer] = []
                self._zarr_arrays[layer] = group.create_array(
                    name=f"layer_{layer}",
                    shape=(tokens, width),
                    chunks=(seq_len, width),
                    shards=(per_shard, width),
                    dtype="float16",
                    compressors=ZstdCodec(level=ZSTD_LEVEL),
                    fill_value=0,
                    dimension_names=("token", "hidden"),
                )

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False

    def write(self, rows: dict[str, np.ndarray], hidden: dict[int, np.ndarray] | None = None) -> None:
        """rows: column -> (B, T[, K]) numpy arrays or encoded pyarrow arrays (see format.encode);
        hidden: layer -> (B*T, H) float16 arrays for the same windows."""
        n = len(rows["window_index"])
        if self._rows + n > self.n_windows:
            raise ValueError(f"shard {self.name} planned for {self.n_windows} windows, got {self._rows + n}")
        cols = []
        for field in self.schema:
            arr = rows[field.name]
            if isinstance(arr, pa.Array):  # lists and binaries come encoded already
                cols.append(arr.cast(field.type))
            elif field.name == "window_index":
                cols.append(pa.array(np.asarray(arr, dtype=np.int64)))
            else:
                cols.append(fixed_lists(arr, *arr.shape[1:]).cast(field.type))
        self._batches.append(pa.RecordBatch.from_arrays(cols, schema=self.schema))
        if hidden and self.trained_only:
            keep = np.asarray(rows["loss_mask"]).astype(bool).reshape(-1)  # (B*T,)
            for layer, values in hidden.items():
                self._pending[layer].append(np.asarray(values)[keep])
            self._flush_hidden(final=False)
        elif hidden:
            start = self._rows * self.seq_len
            for layer, values in hidden.items():
                self._zarr_arrays[layer][start : start + len(values)] = values
        self._rows += n

    def _flush_hidden(self, final: bool) -> None:
        """Append the buffered trained-position hidden states, whole zarr shards only unless `final`."""
        written = 0  # the same for every layer: each gets the same positions
        for layer, parts in self._pending.items():
            if not parts:
                continue
            buf = np.concatenate(parts)
            cut = len(buf) if final else len(buf) // self._zarr_block * self._zarr_block
            if cut:
                arr, start = self._zarr_arrays[layer], self._hidden_rows
                arr.resize((start + cut, arr.shape[1]))
                arr[start : start + cut] = buf[:cut]
            self._pending[layer] = [buf[cut:]] if cut < len(buf) else []
            written = cut
        self._hidden_rows += written

    def add_stat(self, name: str, total: float, count: int) -> None:
        """Accumulate a per-shard mean (e.g. top-k mass, reconstruction KL) recorded in the manifest."""
        acc = self._stats.setdefault(name, [0.0, 0])
        acc[0] += float(total)
        acc[1] += int(count)

    def finish(self) -> ShardRecord:
        """Close the files, rename them to their final names, and return the shard's manifest record."""
        if self._rows == 0:
            raise ValueError(f"shard {self.name}: no rows written")
        if self._rows != self.n_windows:
            raise ValueError(f"shard {self.name} planned for {self.n_windows} windows, wrote {self._rows}")
        # One record batch per shard: a memory-mapped reader then gets every column as a single zero-copy numpy view.
        table = pa.Table.from_batches(self._batches, schema=self.schema).combine_chunks()
        if self.trained_only:
            self._flush_hidden(final=True)
        tmp = tmp_name(self.arrow_path)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, self.schema, options=self.ipc_options) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
        files = {}
        if self._zarr_tmp is not None:
            replace_path(self._zarr_tmp, self.zarr_path)
            for rel in list_files(self.zarr_path):
                files[f"{self.name}.zarr/{rel}"] = sha256_file(self.zarr_path / rel)
        replace_path(tmp, self.arrow_path)
        files[f"{self.name}.arrow"] = sha256_file(self.arrow_path)
        files = dict(sorted(files.items()))
        mask = np.asarray(table.column("loss_mask").combine_chunks().flatten())
        size = sum((self.shards_dir / rel).stat().st_size for rel in files)
        record = ShardRecord(
            name=self.name, windows=self._rows, tokens=self._rows * self.seq_len, valid_tokens=int(mask.sum()), bytes=int(size),
            files={rel: FileMeta(sha256=digest, bytes=(self.shards_dir / rel).stat().st_size) for rel, digest in files.items()},
            stats={k: (s / c if c else None) for k, (s, c) in sorted(self._stats.items())},
        )
        self._batches = []
        return record

    def abort(self) -> None:
        import shutil

        self._batches = []
        if self._zarr_tmp is not None and self._zarr_tmp.exists():
            shutil.rmtree(self._zarr_tmp, ignore_errors=True)
        tmp = tmp_name(self.arrow_path)
        if tmp.exists():
            tmp.unlink()
