"""The shard cache (pipeline/format/cache.py) on its own: pins shared within a process, no waiting between two caches of
one dataset or between a reader and its own prefetch thread, pins given back when a cache is closed or dropped. The
remote side is a local dataset folder read through the same fsspec calls (S3 end to end: tests/test_object_storage.py)."""

from __future__ import annotations

import fcntl
import gc
import os
import threading
import time

import pytest

from pipeline.format import open_dataset
from pipeline.format.cache import ShardCache
from tests.trainer.conftest import dataset_dir  # noqa: F401  (a fixture: 3 shards with hidden states)


def cache_of(dataset_dir, folder, ahead=2):  # noqa: F811
    ds = open_dataset(dataset_dir)
    return ds, ShardCache(ds, folder, 10**9, ahead=ahead)


def pinned_anywhere(lock) -> bool:
    """True while some open file description holds a flock on `lock` (what eviction tests with LOCK_NB)."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def run_with_deadline(fn, seconds=60):
    """fn() in a thread; fails the test instead of hanging the suite when it blocks."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():  # a deadlock guard, not a speed target
        pytest.fail(f"{fn} still blocked after {seconds} s: a deadlock")
    return out["value"]


def test_reader_and_its_prefetch_thread_never_wait_on_each_other(dataset_dir, tmp_path):  # noqa: F811
    """The race that hung the suite: the prefetch thread fetches shard 0 while the reader asks for it."""
    for attempt in range(5):
        ds, cache = cache_of(dataset_dir, tmp_path / f"c{attempt}")
        cache.plan([0, 1, 2])  # prefetch starts on shard 0 now ...
        shards = run_with_deadline(lambda: [cache.open(i) for i in range(3)])  # ... and the reader asks at once
        local = open_dataset(dataset_dir)
        for i, shard in enumerate(shards):
            assert (shard.column("topk_ids") == local.open_shard(i).column("topk_ids")).all()
        cache.close()


def test_two_caches_of_one_dataset_in_one_process(dataset_dir, tmp_path):  # noqa: F811
    """A dataset opened twice over one cache folder (verify, then train, in one process): both read, neither waits."""
    _, a = cache_of(dataset_dir, tmp_path / "c")
    _, b = cache_of(dataset_dir, tmp_path / "c")
    a.plan([0, 1, 2])
    b.plan([2, 1, 0])
    views = run_with_deadline(lambda: [a.open(0), b.open(0), b.open(2), a.open(2), a.open(1), b.open(1)])
    assert [v.record.name for v in views] == ["00000", "00000", "00002", "00002", "00001", "00001"]
    locks = a.locks
    a.close()
    assert all(pinned_anywhere(locks / f"0000{i}.lock") for i in range(3))  # b's views still pin them
    del views
    gc.collect()
    b.close()
    assert not any(pinned_anywhere(locks / f"0000{i}.lock") for i in range(3))


def test_a_dropped_cache_gives_back_its_pins_and_its_thread_ends(dataset_dir, tmp_path):  # noqa: F811
    """No close(): once nothing refers to the cache, its fetched-ahead pins go and its prefetch thread stops, so the
    shards can be evicted and no thread is left behind."""
    ds, cache = cache_of(dataset_dir, tmp_path / "c")
    cache.plan([0, 1, 2])
    view = cache.open(0)
    deadline = time.time() + 30
    while time.time() < deadline and len(list((tmp_path / "c").rglob("*.ready"))) < 3:
        time.sleep(0.05)
    thread, locks = cache._thread, cache.locks
    assert thread.is_alive() and pinned_anywhere(locks / "00001.lock") and pinned_anywhere(locks / "00002.lock")
    del view, cache, ds
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()
    assert not any(pinned_anywhere(locks / f"0000{i}.lock") for i in range(3))


def test_close_keeps_open_views_readable(dataset_dir, tmp_path):  # noqa: F811
    ds, cache = cache_of(dataset_dir, tmp_path / "c")
    view = cache.open(1)
    cache.close()
    assert not pinned_anywhere(cache.locks / "00001.lock")
    assert view.column("input_ids").shape[0] == view.record.windows  # memory-mapped: the files are still there


def test_a_pin_never_waits_on_other_processes_pins(dataset_dir, tmp_path):  # noqa: F811
    """The race that hung DataLoader workers: worker A finds shard 1 missing and goes to fetch it while worker B fetches
    it and then keeps it pinned (a shared flock) for as long as it reads. Had A waited for the lock exclusively it would
    have waited for B's pins, forever. Here another real process holds the shared lock of a shard that is not local yet,
    and the pin still fetches it and returns."""
    import subprocess
    import sys

    ds, cache = cache_of(dataset_dir, tmp_path / "c", ahead=0)
    cache.locks.mkdir(parents=True)
    lock = cache.locks / "00001.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH)\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        view = run_with_deadline(lambda: cache.open(1))
        assert (view.column("topk_ids") == open_dataset(dataset_dir).open_shard(1).column("topk_ids")).all()
        assert (cache.locks / "00001.ready").exists()
    finally:
        holder.kill()
        holder.wait()
    cache.close()
