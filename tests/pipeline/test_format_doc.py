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
    shard = open_dataset(out).shards[0]
    np.testing.assert_array_equal(scope["ids"], shard.column("topk_ids"))
    np.testing.assert_array_equal(scope["mask"], shard.column("loss_mask").astype(bool))
    np.testing.assert_array_equal(scope["pos"], shard.column("position_ids"))  # version 2: restart at each example
    assert scope["ids"].shape[1:] == (16, 5)
    assert (scope["tail"] >= 0).all() and (scope["tail"] <= 1).all()
    np.testing.assert_array_equal(scope["first_window"], shard.hidden(2)[:16])
    # tempered at T = 2 with the stored log-normalizer: p_T over the stored ids plus the tempered tail is a distribution
    lp = shard.column("topk_logprobs").astype(np.float32)
    np.testing.assert_allclose(scope["tempered"], lp / 2 - shard.log_norm(2.0)[..., None], rtol=1e-6)
    mass = np.exp(scope["tempered"]).sum(-1)
    assert (scope["tempered_tail"] > 0).all() and (mass < np.exp(lp).sum(-1)).all()  # flatter at T = 2: more in the tail
    np.testing.assert_allclose(mass + scope["tempered_tail"], 1, atol=1e-5)
