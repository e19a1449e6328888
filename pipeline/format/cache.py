"""A bounded local cache of a remote dataset's shards, fetched ahead of use and checked on arrival. Imports no torch.

`open_dataset(url)` attaches one to a dataset that is not local (s3://, gs://, ...); `Dataset.open_shard(i)` then gives a
view of the local copy: memory-mapped, zero-copy, as fast as a local dataset once warm. Who drives it: the trainer's
`WindowReader` (`plan`: the shards in the order it will read them) and `verify`.

- On arrival every file's sha256 and size are compared with the manifest before it is renamed into place; a shard is
  usable only once all of its files are (a `.ready` record names them and their bytes).
- Ahead of use: a background thread keeps the next `ahead` shards of the plan local, so the reader rarely waits.
- Bounded: before a download, the least recently used shards (of any dataset in the folder) are deleted until the new
  one fits in `max_bytes`. A shard in use is never deleted: each process holds a shared `flock` on the shard's lock file
  while it uses it, and eviction takes the lock exclusively without waiting, skipping what it cannot take. A download
  happens under that shared lock plus an exclusive one on the shard's `.fetch` file, so processes sharing the folder
  (DDP ranks, DataLoader workers) fetch each shard once. Nobody ever waits for the `.lock` exclusively: Linux grants
  new shared locks ahead of a waiting exclusive one, so such a wait could last as long as another process's pins.
- Layout: FOLDER/<first 16 hex of the manifest's sha256>/shards/<shard files> (a dataset rewritten at the same URL gets
  a new key) and .../locks/<shard>.lock, <shard>.fetch, <shard>.ready.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import threading
import weakref
from pathlib import Path

import fsspec

from ..common.errors import FormatError, UserError
from .files import HASH_BLOCK
from .schema import SHARDS_DIR

DEFAULT_CACHE_GB = 20.0
DEFAULT_AHEAD = 2  # shards fetched ahead of the one being read


class ShardCache:
    """The local copies of one remote dataset's shards (see the module docstring); `open(i)` is what the reader uses."""

    def __init__(self, ds, folder, max_bytes: int, ahead: int = DEFAULT_AHEAD):
        self.ds, self.folder, self.max_bytes, self.ahead = ds, Path(folder), int(max_bytes), ahead
        self.root = self.folder / ds.manifest_sha256[:16]
        self.locks = self.root / "locks"
        self._pid = None
        self._owner = os.getpid()  # the process whose filesystem object ds.fs is
        self._held: dict[int, int] = {}  # shard -> pins this object holds in this process (views and fetched-ahead)
        self._reset()
        # a cache dropped without close() gives its pins back when it is collected (its prefetch thread then ends)
        self._finalizer = weakref.finalize(self, _unpin_all, self.locks, [s.name for s in ds.manifest.shards], self._held)

    # --- per process state (a forked DataLoader worker starts afresh; a spawned one gets it pickled without it)

    def _reset(self):
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._wake = threading.Condition(self._mutex)
        self._held.clear()  # pins of the parent process are not this one's
        self._plan: list[int] = []
        self._cursor = 0
        self._ahead_pins: set[int] = set()
        self._thread = None
        self._closed = False
        self._error: BaseException | None = None
        self._fs = None

    def _remote(self):
        """The remote filesystem for downloads: the dataset's own in the process that opened it; in a forked or spawned
        DataLoader worker a new instance (an async filesystem such as s3fs is not fork-safe)."""
        if self._fs is None:
            fs = self.ds.fs
            self._fs = fs if os.getpid() == self._owner else type(fs)(*fs.storage_args, **fs.storage_options)
        return self._fs

    def _process(self):
        if self._pid != os.getpid():
            self._reset()

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._owner = -1  # unpickled in another process: never the dataset's filesystem object
        self._held = {}
        self._reset()
        self._finalizer = None  # made at the first pin: the dataset may not be unpickled yet (it refers to this cache)

    def close(self) -> None:
        """Stop fetching ahead and give back every pin this object holds (views still open keep reading their files)."""
        with self._wake:
            self._plan, self._cursor, self._closed = [], 0, True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._pid == os.getpid() and self._finalizer is not None:
            self._finalizer()

    # --- what the reader calls

    def plan(self, order) -> None:
        """The shards in the order they will be read (repeats allowed); fetching ahead follows it."""
        self._process()
        with self._wake:
            self._plan, self._cursor = [int(i) for i in order], 0
            self._wake.notify()
        self._start()

    def open(self, i: int):
        """A view of shard i on the local copy (fetched now if it is not local yet); it stays cached while the view
        lives."""
        from .reader import Shard

        self._process()
        if self._error is not None:  # a prefetch failed (e.g. a checksum): the shard it was fetching is refused
            error, self._error = self._error, None
            raise error
        self.acquire(i, demanded=True)
        shard = Shard(self._view(), self.ds.manifest.shards[i])
        weakref.finalize(shard, self.release, i)
        with self._wake:
            if i in self._plan[self._cursor:]:
                self._cursor += self._plan[self._cursor:].index(i) + 1
            self._wake.notify()
        self._start()
        return shard

    def _view(self):
        """The dataset as seen through the cache: the same manifest, local files under self.root (messages keep the
        URL)."""
        view = copy.copy(self.ds)
        view.fs, view.root, view.is_local, view.cache = fsspec.filesystem("file"), str(self.root), True, None
        return view

    # --- pins: a shared flock per shard while this process uses it

    def acquire(self, i: int, demanded: bool = True) -> bool:
        """Make shard i local and verified, and pin it. False only for a prefetch that found no room."""
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, _unpin_all, self.locks, [s.name for s in self.ds.manifest.shards], self._held)
        pinned = _pin(self.locks, self.ds.manifest.shards[i].name, lambda: self._download(i, demanded))
        if pinned:
            with self._mutex:
                self._held[i] = self._held.get(i, 0) + 1
        return pinned

    def release(self, i: int) -> None:
        if self._pid != os.getpid():
            return
        with self._mutex:
            if not self._held.get(i):
                return
            self._held[i] -= 1
        _unpin(self.locks, self.ds.manifest.shards[i].name)

    # --- fetching

    def _download(self, i: int, demanded: bool) -> bool:
        record = self.ds.manifest.shards[i]
        need = sum(m.bytes for m in record.files.values())
        if need > self.max_bytes:
            raise UserError(f"shard {record.name} of {self.ds.url} has {need / 1e9:.2f} GB, more than the cache limit "
                            f"({self.max_bytes / 1e9:.2f} GB); pass a larger --cache-gb")
        if not self._make_room(need) and not demanded:
            return False
        local = self.root / SHARDS_DIR
        for rel, meta in sorted(record.files.items()):
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            try:
                self._remote().get_file(f"{self.ds.root}/{SHARDS_DIR}/{rel}", str(tmp))
                h = hashlib.sha256()
                with open(tmp, "rb") as f:
                    while block := f.read(HASH_BLOCK):
                        h.update(block)
                size = tmp.stat().st_size
                if size != meta.bytes or h.hexdigest() != meta.sha256:
                    raise FormatError(f"{self.ds.url}/{SHARDS_DIR}/{rel}: arrived with {size} bytes and sha256 "
                                      f"{h.hexdigest()[:12]}…, the manifest says {meta.bytes} bytes and "
                                      f"{meta.sha256[:12]}…; the remote copy was altered or damaged: re-upload the "
                                      "dataset or rerun precompute")
                os.replace(tmp, dest)
            except FileNotFoundError:
                raise FormatError(f"{self.ds.url}/{SHARDS_DIR}/{rel}: listed in the manifest but missing; re-upload the dataset")
            finally:
                tmp.unlink(missing_ok=True)
        record_path = self.locks / f"{record.name}.ready"
        tmp = record_path.with_name(f"{record_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"bytes": need, "files": sorted(record.files)}))
        os.replace(tmp, record_path)
        return True

    def _make_room(self, need: int) -> bool:
        """Evict least recently used shards (not in use anywhere) until `need` more bytes fit; False if they do not."""
        entries = []
        for ready in self.folder.glob("*/locks/*.ready"):
            try:
                info = json.loads(ready.read_text())
                entries.append((ready.stat().st_mtime, ready, int(info["bytes"]), list(info["files"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        total = sum(e[2] for e in entries)
        for _, ready, size, files in sorted(entries, key=lambda e: e[0]):
            if total + need <= self.max_bytes:
                break
            lock = ready.with_suffix(".lock")
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # in use by some process (or by this one)
                os.close(fd)
                continue
            try:
                ready.unlink(missing_ok=True)  # first: a reader that sees no .ready fetches again
                shards = ready.parent.parent / SHARDS_DIR
                for rel in files:
                    (shards / rel).unlink(missing_ok=True)
                for top in {rel.split("/", 1)[0] for rel in files if "/" in rel}:
                    shutil.rmtree(shards / top, ignore_errors=True)
                total -= size
            finally:
                os.close(fd)
        return total + need <= self.max_bytes

    def _start(self):
        if self.ahead > 0 and not self._closed and (self._thread is None or not self._thread.is_alive()):
            # the thread holds the cache weakly: dropping the cache ends the thread
            self._thread = threading.Thread(target=_prefetch, args=(weakref.ref(self),), name="shard-prefetch", daemon=True)
            self._thread.start()

    def _next_step(self) -> tuple[list[int], list[int]]:
        """(shards to fetch ahead now, fetched-ahead shards the reader went past); under self._wake."""
        upcoming = list(dict.fromkeys(self._plan[self._cursor:]))[: self.ahead]
        todo = [i for i in upcoming if i not in self._ahead_pins]
        stale = [i for i in self._ahead_pins if i not in upcoming]
        self._ahead_pins -= set(stale)
        return todo, stale


def _prefetch(ref) -> None:
    """The prefetch thread: keep the next `ahead` distinct shards of the plan local and pinned; unpin those the reader
    went past. Holds the cache only while working, so a cache nobody uses any more is collected and the thread ends."""
    while True:
        cache = ref()
        if cache is None or cache._closed:
            return
        wake = cache._wake
        with wake:
            todo, stale = cache._next_step()
        if not todo and not stale:
            del cache  # not kept alive while waiting
            with wake:
                wake.wait(timeout=1.0)
            continue
        for i in stale:
            cache.release(i)
        for i in todo:
            try:
                pinned = cache.acquire(i, demanded=False)
            except UserError as e:  # a damaged or missing file: handed to the reader, which raises it at its next open
                cache._error = e
                return
            except Exception:  # noqa: BLE001 (e.g. a dropped connection: the reader's own fetch retries and reports it)
                pinned = False
            if not pinned:  # no room until the reader releases something
                del cache
                with wake:
                    wake.wait(timeout=0.5)
                break
            with cache._mutex:
                cache._ahead_pins.add(i)
        else:
            del cache


# --- the pins of this process, shared by every ShardCache in it: one file description per shard lock file, so two
# caches of one dataset (or a cache and its own prefetch thread) never wait on each other's flock

_PINS_MUTEX = threading.Lock()
_PINS: dict[str, list] = {}  # lock file -> [fd holding a shared flock, users in this process]
_GATES: dict[str, threading.Lock] = {}  # lock file -> one thread of this process at a time takes its flock


def _forget_pins_after_fork() -> None:
    """A forked child (a DataLoader worker) starts without pins: the parent's stay the parent's."""
    global _PINS_MUTEX
    _PINS_MUTEX = threading.Lock()
    _PINS.clear()
    _GATES.clear()


os.register_at_fork(after_in_child=_forget_pins_after_fork)


def _pin(locks: Path, name: str, fetch) -> bool:
    """Pin shard `name` of the cache folder whose lock files are in `locks`, after `fetch()` made it local if it was
    not (fetch returns False when there is no room). False only when fetch did."""
    key = str(locks / f"{name}.lock")
    with _PINS_MUTEX:
        if key in _PINS:
            _PINS[key][1] += 1
            return True
        gate = _GATES.setdefault(key, threading.Lock())
    with gate:
        with _PINS_MUTEX:
            if key in _PINS:  # another thread of this process pinned it while this one waited
                _PINS[key][1] += 1
                return True
        locks.mkdir(parents=True, exist_ok=True)
        ready = locks / f"{name}.ready"
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # shared and kept: no eviction can run on this shard from here on, in any process. Never an exclusive wait
            # on this lock: other processes take it shared whenever they like, so such a wait could last forever.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not ready.exists():
                fetch_fd = os.open(locks / f"{name}.fetch", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fetch_fd, fcntl.LOCK_EX)  # one process downloads; the others find it ready after
                    fetched = ready.exists() or fetch()
                finally:
                    os.close(fetch_fd)
                if not fetched:
                    os.close(fd)
                    return False
        except BaseException:
            os.close(fd)
            raise
        os.utime(ready)  # least recently used goes first
        with _PINS_MUTEX:
            _PINS[key] = [fd, 1]
    return True


def _unpin(locks: Path, name: str) -> None:
    key = str(locks / f"{name}.lock")
    with _PINS_MUTEX:
        entry = _PINS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _PINS[key]
            os.close(entry[0])  # drops the shared flock: the shard may be evicted now


def _unpin_all(locks: Path, names: list[str], held: dict[int, int]) -> None:
    for i, n in list(held.items()):
        for _ in range(n):
            _unpin(locks, names[i])
    held.clear()

