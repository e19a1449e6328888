"""Hidden states read through fsspec: zarr must get a filesystem made for its own event loop (issue 16)."""

from __future__ import annotations

import fsspec
import numpy as np
import zarr
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset
from pipeline.format.zarr_meta import zarr_filesystem
from pipeline.precompute import precompute


def test_zarr_gets_a_fresh_asynchronous_filesystem(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=16, top_k=4,
                                hidden_layers=[-1], max_tokens=200, progress=False))
    expected = open_dataset(out).shards[0].hidden(2)[:]
    # an async filesystem in synchronous mode, already used (its loop is fsspec's, not zarr's): what s3fs is in reader.py
    used = AsyncFileSystemWrapper(fsspec.filesystem("file"), asynchronous=False)
    assert used.ls(str(out / "shards"))
    fresh = zarr_filesystem(used)
    assert fresh is not used and fresh.asynchronous and type(fresh) is type(used)
    assert zarr_filesystem(used) is not fresh  # each zarr open gets its own instance, never a cached one
    store = zarr.storage.FsspecStore(fresh, path=str(out / "shards" / "00000.zarr" / "layer_2"), read_only=True)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r", zarr_format=3)[:], expected)
    # a synchronous filesystem is wrapped for zarr
    mem = fsspec.filesystem("memory")
    assert isinstance(zarr_filesystem(mem), AsyncFileSystemWrapper) and zarr_filesystem(mem).asynchronous
    # and the reader itself, through a memory:// URL
    mem.put(str(out), "/fsspec-hidden-test", recursive=True)
    try:
        np.testing.assert_array_equal(open_dataset("memory:///fsspec-hidden-test").shards[0].hidden(2)[:], expected)
    finally:
        mem.rm("/fsspec-hidden-test", recursive=True)
