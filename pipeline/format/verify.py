"""`verify`: recompute every checksum and check every shard's schema and shapes against the manifest. Imports no torch."""

from __future__ import annotations

import numpy as np

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
    T = ds.seq_len
    for name in ("input_ids", "loss_mask"):
        got = shard.column(name).shape
        if got != (shard.windows, T):
            raise FormatError(f"shard {shard.name}: column {name} has shape {got}, expected {(shard.windows, T)}")
    valid = int(shard.column("loss_mask").sum())
    if valid != shard.record["valid_tokens"]:
        raise FormatError(f"shard {shard.name}: {valid} valid tokens, manifest says {shard.record['valid_tokens']}")
    for kind in ds.target_kinds:
        try:
            ids, logprobs = shard.sparse_targets(kind)
        except (ValueError, IndexError) as e:  # a blob too short for the shape the manifest implies
            raise FormatError(f"shard {shard.name}: {kind} targets do not decode ({e})")
        if ids.shape[:2] != (shard.windows, T) or (kind == "topk" and ids.shape[2] != ds.top_k):
            raise FormatError(f"shard {shard.name}: {kind} targets have shape {ids.shape}, expected {(shard.windows, T)} positions")
        if ids.size and int(ids.max()) >= ds.vocab_size:
            raise FormatError(f"shard {shard.name}: token id {int(ids.max())} outside the vocabulary of {ds.vocab_size}")
        if kind == "sampled":
            counts = np.exp(logprobs.astype(np.float64)) * ds.capture["samples"]
            if ds.capture.get("sample_temperature", 1.0) == 1.0 and not np.allclose(counts.sum(-1), ds.capture["samples"]):
                raise FormatError(f"shard {shard.name}: sample counts do not sum to {ds.capture['samples']} per position")
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
