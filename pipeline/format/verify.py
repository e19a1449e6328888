"""`verify`: everything a dataset can be checked against, shard by shard. Imports no torch.

Opening the dataset checks the whole manifest against itself (types, ranges, schema derived from `capture`, totals,
sizes; format.manifest) and the tokenizer folder against the manifest (format.tokenizer_files). Then, per shard: the
sha256 of every file, the Arrow schema, every column's values (format.values: ids below the vocabulary, masks of 0/1,
log-probs not NaN and never above 0, top-k sorted and distinct, sample counts, list lengths), the packing layout, and
the Zarr metadata and hidden states (shape, no NaN).
"""

from __future__ import annotations

import numpy as np

from ..common.errors import FormatError
from .reader import Dataset, open_dataset
from .values import check_layout, check_values


def check_structure(ds: Dataset) -> None:
    """The cheap checks of every shard, without reading rows (what `distill inspect` runs): each listed file is a
    regular file of its recorded size, the Arrow schema matches the manifest, the Zarr metadata passes."""
    for shard in ds.shards:
        for rel in shard.files:
            shard.check_file(rel)
        shard.check_schema()
        if ds.hidden_layers:
            shard.check_zarr()


def verify_shard(ds: Dataset, i: int) -> None:
    shard = ds.open_shard(i)  # a remote dataset's shard comes from its local cache, checked on arrival
    shard.verify_checksums()
    shard.table  # noqa: B018  (reading it checks the schema and the row count against the manifest)
    check_values(shard)
    check_layout(shard)
    T = ds.seq_len
    where = np.argwhere(shard.stored_mask()) if ds.hidden_layers else None  # (rows, 2): (window, position) of each row
    for layer in ds.hidden_layers:
        arr = shard.hidden(layer)
        width = ds.capture.hidden_width(layer)
        expected = (shard.hidden_rows_count(), width)  # windows * T, or the trained positions only
        if arr.shape != expected:
            raise FormatError(f"shard {shard.name}: layer {layer} has shape {arr.shape}, expected {expected}")
        for start in range(0, arr.shape[0], 64 * T):  # a few windows at a time: memory stays small
            try:
                block = np.asarray(arr[start : start + 64 * T])
            except Exception as e:  # the metadata passed its checks; a chunk zarr cannot decode is a damaged file
                raise FormatError(f"{shard.where(f'{shard.name}.zarr/layer_{layer}')}: zarr cannot read rows from "
                                  f"{start} ({type(e).__name__}: {' '.join(str(e).split())[:150]})")
            if np.isnan(block).any():
                row = start + int(np.argwhere(np.isnan(block))[0][0])
                w, t = (int(x) for x in where[row])
                raise FormatError(f"{shard.where(f'{shard.name}.zarr/layer_{layer}')}: NaN hidden state at window "
                                  f"{w}, position {t}; the dataset was written wrong or altered")


def verify_dataset(url, progress=None, **open_options) -> Dataset:
    """Check a whole dataset; raise FormatError naming the first bad file, return the opened dataset when sound.

    progress: called with each shard once it is verified (e.g. a progress bar's update)."""
    ds = open_dataset(url, **open_options)  # storage_options, cache_dir, cache_gb (a remote dataset)
    if ds.manifest.tokenizer.files is None:
        raise FormatError(f"{ds.url}/manifest.json: `tokenizer.files` is missing, so the tokenizer cannot be checked; "
                          "the dataset was not written by distill precompute")
    if ds.cache is not None:
        ds.cache.plan(range(len(ds.shards)))  # fetched ahead while the previous shard is checked
    for i in range(len(ds.shards)):
        verify_shard(ds, i)
        if progress:
            progress(ds.shards[i])
    return ds
