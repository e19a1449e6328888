"""A bounded local cache of a remote dataset's shards, fetched ahead of use and checked on arrival. Imports no torch.

`open_dataset(url)` attaches one to a dataset that is not local (s3://, gs://, ...); `Dataset.open_shard(i)` then gives a
view of the local copy: memory-mapped, zero-copy, as fast as a local dataset once warm. Who drives it: the trainer's
`WindowReader` (`plan`: the shards in the order it will read them) and `verify`.

- On arrival every file's sha256 and size are compared with the manifest before it is renamed into place; a shard is
  usable only once all of its files are (a `.ready` record names them and their bytes).
- Ahead of use: a background thread keeps the next `ahead` shards of the plan local, so the reader rarely waits.
- Bounded: before a download, the least recently used shards (of any dataset in the folder) are deleted until the new
  one fits in `max_bytes`. A shard in use is never deleted: each process holds a shared `flock` on the shard's lock file
  while it uses it, and eviction takes the lock exclusively without waiting, skipping what it cannot take. Downloads
  take it exclusively too, so processes sharing the folder (DDP ranks, DataLoader workers) fetch each shard once.
- Layout: FOLDER/<first 16 hex of the manifest's sha256>/shards/<shard files> (a dataset rewritten at the same URL gets
  a new key) and .../locks/<shard>.lock, <shard>.ready.
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
        self._reset()

    # --- per process state (a forked DataLoader worker starts afresh; a spawned one gets it pickled without it)

    def _reset(self):
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._wake = threading.Condition(self._mutex)
        self._held: dict[int, list] = {}  # shard -> [fd of its lock file, users in this process]
        self._plan: list[int] = []
        self._cursor = 0
        self._ahead_pins: set[int] = set()
        self._thread = None
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
        self._reset()

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
        """Make shard i local and verified, and pin it. False only for a prefetch that found no room.

        Known issue: flock pins belong to open file descriptions, so two ShardCache objects over one cache folder in
        one process (the same remote dataset opened twice) can block each other here; open a remote dataset once per
        process, or give each its own --cache-dir."""
        name = self.ds.manifest.shards[i].name
        with self._mutex:
            if i in self._held:
                self._held[i][1] += 1
                return True
        self.locks.mkdir(parents=True, exist_ok=True)
        ready = self.locks / f"{name}.ready"
        fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if ready.exists():  # under the shared lock: complete, and no eviction can run now
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    fetched = ready.exists() or self._download(i, demanded)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                if not fetched:
                    os.close(fd)
                    return False
        except BaseException:
            os.close(fd)
            raise
        os.utime(ready)  # least recently used goes first
        with self._mutex:
            if i in self._held:  # another thread of this process pinned it meanwhile
                self._held[i][1] += 1
                os.close(fd)
            else:
                self._held[i] = [fd, 1]
        return True

    def release(self, i: int) -> None:
        if self._pid != os.getpid():
            return
        with self._mutex:
            entry = self._held.get(i)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[i]
                os.close(entry[0])  # drops the shared flock: the shard may be evicted now

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
        if self.ahead > 0 and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._prefetch, name="shard-prefetch", daemon=True)
            self._thread.start()

    def _prefetch(self):
        """Keep the next `ahead` distinct shards of the plan local and pinned; unpin those the reader went past."""
        while True:
            with self._wake:
                upcoming = list(dict.fromkeys(self._plan[self._cursor:]))[: self.ahead]
                todo = [i for i in upcoming if i not in self._ahead_pins]
                stale = [i for i in self._ahead_pins if i not in upcoming]
                self._ahead_pins -= set(stale)
                if not todo and not stale:
                    self._wake.wait(timeout=1.0)
                    continue
            for i in stale:
                self.release(i)
            for i in todo:
                try:
                    pinned = self.acquire(i, demanded=False)
                except UserError as e:  # a damaged or missing file: handed to the reader, which raises it at its next open
                    self._error = e
                    return
                except Exception:  # noqa: BLE001 (e.g. a dropped connection: the reader's own fetch retries and reports it)
                    pinned = False
                if not pinned:  # no room until the reader releases something
                    with self._wake:
                        self._wake.wait(timeout=0.5)
                    break
                with self._mutex:
                    self._ahead_pins.add(i)

