"""`verify`: recompute every checksum and check every shard's schema and shapes against the manifest. Imports no torch."""

from __future__ import annotations

from ..errors import FormatError
from .reader import Dataset, open_dataset
from .schema import schema_description


def verify_shard(ds: Dataset, i: int) -> None:
    shard = ds.shards[i]
    shard.verify_checksums()
    expected = ds.manifest["schema"]
    found = schema_description(shard.table.schema)
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()))
        raise FormatError(f"shard {shard.name}: columns differ from the manifest schema: {diff}")
    T, K = ds.seq_len, ds.top_k
    for name, shape in [("input_ids", (shard.windows, T)), ("loss_mask", (shard.windows, T))] + (
        [("topk_ids", (shard.windows, T, K))] if K else []
    ):
        got = shard.column(name).shape
        if got != shape:
            raise FormatError(f"shard {shard.name}: column {name} has shape {got}, expected {shape}")
    valid = int(shard.column("loss_mask").sum())
    if valid != shard.record["valid_tokens"]:
        raise FormatError(f"shard {shard.name}: {valid} valid tokens, manifest says {shard.record['valid_tokens']}")
    if K:
        ids = shard.column("topk_ids")
        if ids.size and int(ids.max()) >= ds.vocab_size:
            raise FormatError(f"shard {shard.name}: token id {int(ids.max())} outside the vocabulary of {ds.vocab_size}")
    for layer in ds.hidden_layers:
        arr = shard.hidden(layer)
        width = next(x["width"] for x in ds.capture["hidden_layers"] if x["index"] == layer)
        if arr.shape != (shard.windows * T, width):
            raise FormatError(f"shard {shard.name}: layer {layer} has shape {arr.shape}, expected {(shard.windows * T, width)}")


def verify_dataset(url, progress=None) -> Dataset:
    """Check a whole dataset; raise FormatError naming the first bad shard, return the opened dataset when sound."""
    ds = open_dataset(url)
    totals = ds.manifest["totals"]
    if ds.windows != totals["windows"]:
        raise FormatError(f"manifest lists {ds.windows} windows in its shards but {totals['windows']} in its totals")
    for i in range(len(ds.shards)):
        verify_shard(ds, i)
        if progress:
            progress(ds.shards[i])
    return ds
