"""Output folders (a dataset being captured, a training run): one writer at a time, never through a symlink, and the
leftovers of a killed run removed. Used by `pipeline.precompute` and `trainer.train`. Imports no torch.

The lock is `flock` on the folder itself, not on a lock file: the kernel drops it when the process dies however it
dies (SIGKILL included), so it is never stale, and it leaves nothing in the folder. An exclusive lock keeps a second
`precompute` or `train` out; the ranks of one capture (`--rank`) take it shared, since each writes only its own shards.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from .errors import UserError
from .files import walk_plain

TEMP_MARK = ".tmp-"  # every temp name we write contains it (files.tmp_name, checkpoint and tokenizer folders)
_HELD: dict[str, int] = {}  # folder (real path) -> fd of this process's lock on it


def make_out_folder(out: Path, flag: str = "--out") -> Path:
    """Create `out` (and its parents); refuse a path that exists and is not a folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, expected a folder; choose a folder path (new or empty)")
    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} {out} is a broken symlink; remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def lock_folder(out: Path, *, shared: bool = False, what: str = "--out", hint: str = "", wait: float = 0.0) -> int:
    """Take this process's lock on the folder: exclusive, or shared (ranks of one capture); refuse when another process
    holds a conflicting one. `wait` seconds of retrying cover another rank's brief exclusive cleanup. Returns a handle
    for `unlock_folder`. Taking it again in the same process (a new run after one that raised) replaces the old one."""
    key = os.path.realpath(out)
    if key in _HELD:
        unlock_folder(_HELD[key])
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            os.close(fd)
            raise UserError(f"{what} {out} is being written by another running distill process; wait for it to finish or "
                            f"choose another {what}{hint}")
    _HELD[key] = fd
    return fd


def lock_rank(progress: Path, rank: int, world_size: int) -> int:
    """Ranks share the folder lock, so two processes started with the same --rank would compute the same shards twice:
    each rank also locks its own file in `_progress/` (gone with `_progress/` when the capture finishes)."""
    path = progress / f"rank-{rank:05d}-of-{world_size:05d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--rank {rank} of this capture is already running in another process on {progress.parent}; "
                        "give each process its own --rank")
    return fd


def try_exclusive(fd: int) -> bool:
    """Upgrade a shared lock to exclusive when no other process holds it (False otherwise: the shared lock may be lost,
    so call this only when about to return)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def unlock_folder(fd: int) -> None:
    for key, held in list(_HELD.items()):
        if held == fd:
            del _HELD[key]
    try:
        os.close(fd)  # closing the only descriptor releases the flock
    except OSError:
        pass


def refuse_links(out: Path) -> None:
    """Refuse a folder holding a symlink or a special file anywhere below it: writing there could follow the link out of
    the folder (overwrite or delete someone else's files). `out` itself may be a symlink (a folder on another disk)."""
    walk_plain(Path(os.path.realpath(out)))


def remove_leftovers(folder: Path, recursive_into: tuple[str, ...] = ()) -> list[str]:
    """Delete temp files and folders (names containing `.tmp-`) of killed runs directly in `folder` and in its
    sub-folders `recursive_into`. Only for the holder of the exclusive lock: a rank may be writing its own right now."""
    removed = []
    for sub in ("", *recursive_into):
        d = folder / sub if sub else folder
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if TEMP_MARK in p.name:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p.relative_to(folder).as_posix())
    return removed


def only_leftovers(folder: Path, ours: tuple[str, ...]) -> bool:
    """True when everything in `folder` is a temp name or one of the sub-folders `ours` holding only temp names: what a
    run killed before it recorded its settings leaves (it may be reused as if empty)."""
    for p in folder.iterdir():
        if TEMP_MARK in p.name:
            continue
        if p.name in ours and p.is_dir() and not p.is_symlink() and all(TEMP_MARK in q.name for q in p.iterdir()):
            continue
        return False
    return True
