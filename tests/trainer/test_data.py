"""The streaming reader: epoch order, coverage across ranks and workers, exact resume, checksums, fsspec URLs."""

from __future__ import annotations

import json
import re
import shutil

import fsspec
import numpy as np
import pytest
import torch

from pipeline.common.errors import FormatError, UserError
from pipeline.format import open_dataset
from trainer.data import IGNORE_INDEX, WindowReader, check_batch, epoch_order, make_loader

SIZES = [7, 7, 7, 7, 3]  # 31 windows in 5 uneven shards


def stream(reader, n_batches, workers=0):
    """window_index of each of the next n batches, as the training loop would see them (advancing the reader)."""
    out, loader = [], iter(make_loader(reader, workers))
    try:
        for _ in range(n_batches):
            batch = check_batch(next(loader))
            reader.advance(batch)
            out.append(batch["window_index"].tolist())
    finally:
        del loader  # stop the workers now: kept alive by an exception's traceback, their shutdown would wait 5 s
    return out


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(SIZES, seed=3, epoch=0), epoch_order(SIZES, seed=3, epoch=0)
    assert np.array_equal(a, b) and len(a) == sum(SIZES)
    assert len({tuple(x) for x in a.tolist()}) == sum(SIZES)  # every (shard, row) once
    assert not np.array_equal(a, epoch_order(SIZES, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(SIZES, seed=4, epoch=0))
    # shards are read one after another: a shard's windows are contiguous in the order
    shards = a[:, 0]
    assert (np.diff(shards) != 0).sum() == len(SIZES) - 1
    assert np.array_equal(epoch_order(SIZES, 0, 0, shuffle=False)[:7, 1], np.arange(7))
    assert np.array_equal(epoch_order(SIZES, 3, 0, part=slice(5, 19)), a[5:19])  # a rank's part, built alone


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_ranks_cover_the_epoch_without_overlap(fake_dataset, world_size):
    ds = open_dataset(fake_dataset(SIZES))
    readers = [WindowReader(ds, 2, seed=1, rank=r, world_size=world_size, epochs=1) for r in range(world_size)]
    seen = [sum(stream(r, r.batches_per_epoch), []) for r in readers]
    assert len({r.batches_per_epoch for r in readers}) == 1  # DDP needs the same number of steps on every rank
    flat = sum(seen, [])
    assert len(flat) == len(set(flat)) == (31 // world_size) * world_size  # no overlap; only N mod W dropped
    dropped = set(range(31)) - set(flat)
    assert len(dropped) == 31 % world_size
    if world_size == 1:
        assert sorted(flat) == list(range(31))


def test_fewer_shards_than_ranks_split_by_window(fake_dataset):
    ds = open_dataset(fake_dataset([6]))
    seen = [sum(stream(WindowReader(ds, 1, rank=r, world_size=3, epochs=1), 2), []) for r in range(3)]
    assert sorted(sum(seen, [])) == list(range(6)) and all(len(s) == 2 for s in seen)


def test_workers_give_the_same_stream(fake_dataset):
    path = fake_dataset(SIZES)
    alone = stream(WindowReader(path, 3, seed=2), 25)  # crosses two epoch boundaries (11 batches per epoch)
    assert stream(WindowReader(path, 3, seed=2), 25, workers=2) == alone
    # each worker read a disjoint subset: batches alternate between them, none repeated within an epoch
    first_epoch = sum(alone[:11], [])
    assert sorted(first_epoch) == list(range(31))


def test_resume_continues_exactly(fake_dataset):
    path = fake_dataset(SIZES)
    full = stream(WindowReader(path, 4, seed=5), 20)
    first = WindowReader(path, 4, seed=5)
    head = stream(first, 9)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1  # 8 batches per epoch
    resumed = WindowReader(path, 4, seed=5)
    resumed.load_state_dict(state)
    assert head + stream(resumed, 11, workers=2) == full


def test_resume_refuses_another_world_size(fake_dataset):
    path = fake_dataset(SIZES)
    state = WindowReader(path, 4, rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="processes 2 but this run has 1"):
        WindowReader(path, 4).load_state_dict(state)


def test_batch_contents(fake_dataset):
    path = fake_dataset([5], seq_len=4, vocab=50, top_k=3, hidden={1: 8})
    reader = WindowReader(path, 5, shuffle=False, epochs=1, hidden_layers=(1,))
    batch = check_batch(next(iter(reader)))
    shard = open_dataset(path).shards[0]
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (5, 4)
    assert torch.equal(batch["input_ids"], torch.from_numpy(shard.column("input_ids").astype(np.int64)))
    assert (batch["labels"][:, -1] == IGNORE_INDEX).all() and (batch["labels"][:, :-1] >= 0).all()  # loss_mask 0 -> -100
    assert batch["teacher_ids"].shape == (5, 4, 3) and batch["teacher_ids"].dtype == torch.int64
    assert batch["teacher_logprobs"].dtype == torch.float32
    assert batch["hidden"][1].shape == (5, 4, 8)
    assert torch.equal(batch["hidden"][1][:, :, 0], batch["window_index"][:, None].expand(5, 4).half())
    no_targets = check_batch(next(iter(WindowReader(path, 5, targets="none"))))
    assert "teacher_ids" not in no_targets and "hidden" not in no_targets


def test_batches_spanning_shards_keep_their_order(fake_dataset):
    path = fake_dataset([3, 3, 3])
    reader = WindowReader(path, 4, seed=7, epochs=1)
    order = reader.rank_order(0)
    ds = open_dataset(path)
    expected = [int(ds.shards[s].column("window_index")[r]) for s, r in order.tolist()]
    assert sum(stream(reader, 3), []) == expected


def test_checksum_mismatch_names_the_shard(fake_dataset, tmp_path):
    path = fake_dataset([4, 4])
    arrow = path / "shards" / "00001.arrow"
    data = bytearray(arrow.read_bytes())
    data[-20] ^= 0xFF
    arrow.write_bytes(bytes(data))
    reader = WindowReader(path, 4, shuffle=False, epochs=1)
    with pytest.raises(FormatError, match="shard 00001: checksum mismatch"):
        stream(reader, 2)
    with pytest.raises(FormatError, match="shard 00001"):  # raised cleanly through a worker process too
        stream(WindowReader(path, 4, shuffle=False, epochs=1), 2, workers=1)


def test_reads_from_an_fsspec_url(fake_dataset):
    path = fake_dataset(SIZES)
    fs = fsspec.filesystem("memory")
    fs.put(str(path), "/ds-url-test", recursive=True)
    try:
        remote = stream(WindowReader("memory:///ds-url-test", 4, seed=1), 8)
        local = stream(WindowReader(f"file://{path}", 4, seed=1), 8)
        assert remote == local == stream(WindowReader(str(path), 4, seed=1), 8)
    finally:
        fs.rm("/ds-url-test", recursive=True)


def test_too_few_windows_for_the_ranks(fake_dataset):
    with pytest.raises(UserError, match="too few for 4 processes"):
        WindowReader(fake_dataset([3]), 2, rank=0, world_size=4)


def test_dataset_copy_is_independent(fake_dataset, tmp_path):
    """A copied dataset reads the same: the reader trusts only the manifest, not absolute paths."""
    path = fake_dataset(SIZES)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert stream(WindowReader(copy, 4, seed=9), 5) == stream(WindowReader(path, 4, seed=9), 5)


# --- damaged or crafted datasets: refused before any of their data is used (issues 9 R3 and 14) ----------------------


def crafted_copy(dataset_dir, tmp_path, change=None, shard="00001"):
    """A copy of the real precomputed dataset with one shard's column changed and the manifest re-signed."""
    from tests.pipeline.test_crafted_datasets import rewrite_shard

    copy = tmp_path / "crafted"
    shutil.copytree(dataset_dir, copy)
    if change is not None:
        rewrite_shard(change, shard)(copy)
    return copy


@pytest.mark.parametrize("column,value,message", [
    ("topk_logprobs", np.nan, r"topk_logprobs: NaN at window 3, position 2"),
    ("topk_logprobs", 0.25, r"topk_logprobs: log-prob 0.25 > 0 at window 3, position 2"),
    ("labels", 320, r"labels: token id 320 at window 3, position 2 is outside the vocabulary of 320"),
    ("input_ids", 5000, r"input_ids: token id 5000"),
])
def test_impossible_values_stop_the_reader_before_their_shard_is_used(dataset_dir, tmp_path, column, value, message):
    """NaN or positive log-probs would silently zero or corrupt the KD term, ids >= vocab crash the embedding: the
    shard is refused when first opened, and no batch of it is ever handed out."""
    from tests.pipeline.test_crafted_datasets import replace_column, set_at

    index = (3, 2, 0) if column.startswith("topk") else (3, 2)
    copy = crafted_copy(dataset_dir, tmp_path, replace_column(column, set_at(index, value)))
    reader = WindowReader(copy, 4, shuffle=False, epochs=1)
    seen = []
    with pytest.raises(FormatError, match=rf"shards/00001.arrow: column {message}"):
        for batch in make_loader(reader, 0):
            seen += check_batch(batch)["window_index"].tolist()
    assert seen == list(range(16))  # shard 0 only: nothing of shard 1 was used


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_flipped_tokenizer_byte_stops_train_before_step_1(dataset_dir, tmp_path, student_config, name):
    copy = crafted_copy(dataset_dir, tmp_path)
    data = bytearray((copy / "tokenizer" / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "tokenizer" / name).write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"tokenizer/{name}: checksum mismatch"):
        WindowReader(copy, 4)
    from click.testing import CliRunner

    from pipeline.common.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", str(copy), "--student-config", str(student_config), "--out", str(out),
                                  "--steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and f"tokenizer/{name}" in lines[0], r.output
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("windows", [-3, 0, 10**12])
def test_absurd_window_counts_are_refused_before_allocating(fake_dataset, windows):
    path = fake_dataset([4, 4])
    m = json.loads((path / "manifest.json").read_text())
    m["shards"][1]["windows"] = windows
    m["totals"]["windows"] = 4 + windows
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=rf"manifest.json: `shards\[1\].windows` is {windows}"):
        WindowReader(path, 4)


def test_a_symlinked_shard_is_refused(fake_dataset, tmp_path):
    import os

    path = fake_dataset([4, 4])
    outside = tmp_path / "outside.arrow"
    shutil.move(path / "shards" / "00001.arrow", outside)
    os.symlink(outside, path / "shards" / "00001.arrow")
    reader = WindowReader(path, 4, shuffle=False, epochs=1)
    with pytest.raises(FormatError, match=r"00001.arrow is a symlink"):
        stream(reader, 2)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_hidden_states_from_an_fsspec_url(dataset_dir, scheme):
    """Hidden states through an fsspec URL read like local ones: zarr gets a filesystem made for its own event loop
    (issue 16: an async filesystem used from another loop failed with "attached to a different loop")."""
    local = WindowReader(dataset_dir, 4, seed=2, hidden_layers=(1, 2))
    if scheme == "memory":
        fs = fsspec.filesystem("memory")
        fs.put(str(dataset_dir), "/hidden-url-test", recursive=True)
        url = "memory:///hidden-url-test"
    else:
        url = f"file://{dataset_dir}"
    try:
        a, b = iter(make_loader(local, 0)), iter(make_loader(WindowReader(url, 4, seed=2, hidden_layers=(1, 2)), 0))
        for _ in range(5):  # crosses shards
            x, y = check_batch(next(a)), check_batch(next(b))
            assert torch.equal(x["input_ids"], y["input_ids"])
            for layer in (1, 2):
                assert torch.equal(x["hidden"][layer], y["hidden"][layer])
    finally:
        if scheme == "memory":
            fsspec.filesystem("memory").rm("/hidden-url-test", recursive=True)


def test_train_refuses_nan_log_probs_before_step_1_in_one_line(dataset_dir, tmp_path, student_config):
    """NaN teacher log-probs in every shard: `distill train` stops before its first step with one line naming the
    shard file and column (the KD term is never silently zeroed)."""
    from click.testing import CliRunner

    from pipeline.common.cli import main
    from tests.pipeline.test_crafted_datasets import replace_column, rewrite_shard, set_at

    copy = crafted_copy(dataset_dir, tmp_path)
    for shard in ("00000", "00001", "00002"):
        rewrite_shard(replace_column("topk_logprobs", set_at((0, 0, 0), np.nan)), shard)(copy)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", str(copy), "--student-config", str(student_config), "--out", str(out),
                                  "--steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(r"shards/0000\d.arrow: column topk_logprobs: NaN at window 0, position 0", lines[0]), r.output
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not any(json.loads(line).get("step") for line in metrics.read_text().splitlines())
