"""The querying recipe of docs/FORMAT.md (pyarrow.dataset, polars, DuckDB), run as written against a real dataset; the
parts for polars and DuckDB run where those packages are installed (they are not dependencies)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset
from pipeline.precompute import precompute

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def recipe() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return next(b for b in blocks if "pyarrow.dataset" in b)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("query") / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=16, top_k=5,
                                shard_size=8, max_tokens=16 * 20 - 3, progress=False))  # the last window padded
    return out


def test_stream_shards_are_not_read_directly_by_pyarrow_dataset(dataset):
    import pyarrow.dataset as pads

    with pytest.raises(Exception):
        pads.dataset(str(dataset / "shards"), format="ipc").to_table()


def test_querying_recipe(dataset):
    code = recipe().replace('root = "DATASET"', f'root = "{dataset}"')
    have = {m: importlib.util.find_spec(m) is not None for m in ("polars", "duckdb")}
    for module, start in (("polars", "import polars"), ("duckdb", "def widen")):
        if not have[module]:
            code = code[:code.index(start)]  # run the part before it
            break
    scope: dict = {}
    exec(code, scope)
    ds = open_dataset(dataset)
    assert len(ds.shards) == 3
    np.testing.assert_array_equal(scope["first"].column("window_index").to_numpy(), np.arange(5))
    shards = [ds.open_shard(i) for i in range(len(ds.shards))]
    assert ds.capture.positions == "trained"  # packed text with padding: targets only where loss_mask is 1
    stored = [s.stored_mask() for s in shards]  # (W, T) each
    assert not all(m.all() for m in stored)
    logprob = np.concatenate([s.column("target_logprob")[m] for s, m in zip(shards, stored)])  # the stored values only
    if have["polars"]:
        assert scope["mean_logprob"] == pytest.approx(float(logprob.astype(np.float64).mean()), rel=1e-5)
    if have["polars"] and have["duckdb"]:  # rank 1 at each window's first stored position
        top = np.concatenate([s.column("topk_logprobs")[np.arange(s.windows), m.argmax(1), 0] for s, m in zip(shards, stored)])
        assert scope["windows"] == ds.windows == 20
        assert scope["top1"] == pytest.approx(float(top.astype(np.float64).mean()), rel=1e-5)
