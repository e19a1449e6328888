"""The reader example in docs/FORMAT.md, run as written (pyarrow + zarr only) against a real dataset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.config import PrecomputeConfig
from pipeline.format import open_dataset
from pipeline.precompute import precompute

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return next(b for b in blocks if "pa.ipc.open_stream" in b)


def test_format_doc_example_reads_a_dataset(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "ds"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=[str(corpus_dir)], out=str(out), seq_len=16, top_k=5,
                                hidden_layers=[-1], max_tokens=300, temperatures=[1, 2], progress=False))
    scope: dict = {}
    exec(doc_example().replace('root = "DATASET"', f'root = "{out}"'), scope)
    ds = open_dataset(out)
    shard = ds.shards[0]
    assert ds.capture.positions == "trained"  # packed text: padding positions store no targets
    mask = shard.column("loss_mask").astype(bool)
    assert not mask.all() and mask.any()
    np.testing.assert_array_equal(scope["mask"], mask)
    assert scope["ids"].shape[1:] == (16, 5)
    # the doc's scatter (entry j of a window = its j-th trained position) agrees with the reader's at every trained position
    np.testing.assert_array_equal(scope["ids"][mask], shard.column("topk_ids")[mask])
    np.testing.assert_array_equal(scope["ids"][~mask], 0)
    table = shard.table
    np.testing.assert_array_equal(np.diff(table.column("topk_ids").combine_chunks().offsets.to_numpy()), mask.sum(1))
    np.testing.assert_array_equal(scope["pos"], shard.column("position_ids"))  # version 2: restart at each example
    tail = scope["tail"][mask]
    assert (tail >= 0).all() and (tail <= 1).all()
    first = shard.hidden_windows(2, [0])[0]  # (T, width), 0 at positions without targets
    np.testing.assert_array_equal(scope["first_window"], first)
    np.testing.assert_array_equal(scope["first_window"][mask[0]], shard.hidden(2)[: int(mask[0].sum())])
    assert shard.hidden(2).shape[0] == int(mask.sum())  # hidden states only at the trained positions
    # tempered at T = 2 with the stored log-normalizer: p_T over the stored ids plus the tempered tail is a distribution
    lp = shard.column("topk_logprobs").astype(np.float32)[mask]  # (P, K)
    tempered, tempered_tail = scope["tempered"][mask], scope["tempered_tail"][mask]
    np.testing.assert_allclose(tempered, lp / 2 - shard.log_norm(2.0)[mask][..., None], rtol=1e-6)
    mass = np.exp(tempered).sum(-1)
    assert (tempered_tail > 0).all() and (mass < np.exp(lp).sum(-1)).all()  # flatter at T = 2: more in the tail
    np.testing.assert_allclose(mass + tempered_tail, 1, atol=1e-5)
