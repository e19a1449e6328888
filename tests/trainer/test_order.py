"""The epoch order with shuffle blocks (trainer/data.py epoch_order, --shuffle-shards): a permutation of every window,
mixed across the shards of a block, reproducible by part, and what a resumed run must match."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.common.errors import UserError
from tests.trainer.conftest import dataset_dir  # noqa: F401  (a fixture: 3 shards of 16 windows)
from trainer.data import WindowReader, epoch_order

SIZES = [30, 7, 30, 30, 1, 30, 30, 30, 12]


def every_window(sizes):
    return sorted((s, r) for s, n in enumerate(sizes) for r in range(n))


@pytest.mark.parametrize("block", [1, 2, 4, 9, 100])
def test_each_block_size_gives_a_permutation_of_every_window(block):
    order = epoch_order(SIZES, seed=5, epoch=2, block_shards=block)
    assert sorted(map(tuple, order.tolist())) == every_window(SIZES)
    # a rank's part built alone equals that part of the whole order
    for lo, hi in ((0, 40), (33, 101), (150, 200)):
        assert np.array_equal(epoch_order(SIZES, 5, 2, part=slice(lo, hi), block_shards=block), order[lo:hi])


def test_blocks_mix_shards_and_one_shard_blocks_do_not():
    """With one shard per block, 16 consecutive windows come from 1 or 2 shards (3 where a tiny shard lies between);
    with the whole dataset as one block, from as many as a global shuffle's (about 6 of 9 distinct)."""
    def shards_per_batch(order):
        return [len(set(order[i:i + 16, 0].tolist())) for i in range(0, len(order) - 15, 16)]

    one = [epoch_order(SIZES, seed, 0, block_shards=1) for seed in range(10)]
    mixed = [epoch_order(SIZES, seed, 0, block_shards=len(SIZES)) for seed in range(10)]
    assert max(max(shards_per_batch(o)) for o in one) <= 3 and np.mean([np.mean(shards_per_batch(o)) for o in one]) < 2
    assert np.mean([np.mean(shards_per_batch(o)) for o in mixed]) > 5
    # blocks keep to their shards: 9 shards in blocks of 3, in the seeded shard order (recomputed here)
    order = epoch_order(SIZES, 1, 0, block_shards=3)
    perm = np.random.default_rng([1, 0]).permutation(len(SIZES))
    start = 0
    for j in range(3):
        members = perm[3 * j:3 * j + 3].tolist()
        n = sum(SIZES[s] for s in members)
        assert set(order[start:start + n, 0].tolist()) == set(members)
        start += n

def test_unshuffled_order_ignores_blocks():
    assert np.array_equal(epoch_order(SIZES, 0, 0, shuffle=False, block_shards=4),
                          np.array([(s, r) for s, n in enumerate(SIZES) for r in range(n)]))


def test_reader_reads_every_window_once_per_epoch_and_resume_checks_the_block(dataset_dir):  # noqa: F811
    reader = WindowReader(str(dataset_dir), 5, seed=2, epochs=1, block_shards=3)
    seen = np.concatenate([b["window_index"].numpy() for b in reader])
    assert sorted(seen.tolist()) == list(range(sum(reader.sizes)))
    first = next(iter(WindowReader(str(dataset_dir), 16, seed=2, epochs=1, block_shards=3)))
    ids = first["window_index"].numpy()
    shard_of = np.searchsorted(np.cumsum(reader.sizes), ids, side="right")
    assert len(set(shard_of.tolist())) >= 2  # one batch draws on several shards
    state = reader.state_dict()
    with pytest.raises(UserError, match="--shuffle-shards 3 but this run has 1"):
        WindowReader(str(dataset_dir), 5, seed=2, epochs=1, block_shards=1).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "block_shards"}  # a checkpoint from before --shuffle-shards
    WindowReader(str(dataset_dir), 5, seed=2, epochs=1, block_shards=1).load_state_dict(old)
