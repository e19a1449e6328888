"""Files both stages write and read: atomic writes (temp name, then rename), leftovers of killed runs, and the
plain-file checks (no symlink, FIFO or device where a dataset or run folder expects a file or folder). Imports no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from .errors import FormatError


def tmp_name(path: Path) -> Path:
    # The pid keeps two ranks on a shared filesystem from writing the same temp file.
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_path(tmp: Path, final: Path) -> None:
    """Rename a finished temp file or folder onto its final name (a stale folder from a crash is removed first)."""
    if final.is_dir() and tmp.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_temp_files(folder: Path, owned=lambda name: True) -> None:
    """Delete leftovers of a killed run (names containing `.tmp-`) for which `owned(name)` holds.

    With several ranks sharing a folder, each removes only its own shards' leftovers: another rank may be writing now.
    """
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if ".tmp-" in p.name and owned(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_plain(root: str | Path, rel: str = "", kind: str = "file", must_exist: bool = True, check_root: bool = False) -> Path:
    """Refuse symlinks and special files on the way from `root` to `root/rel`, without opening or following anything.

    Every existing component below `root` (and `root` itself when `check_root`) must be a real folder (not a symlink),
    and the last one a regular file (`kind="file"`), a real folder (`"dir"`) or either (`"any"`). A symlink could point
    outside the dataset or run folder (read or overwrite someone else's files); a FIFO or a device such as /dev/zero
    would make a reader hang or never end. With `must_exist=False` a missing tail is fine (a path about to be written).
    For reading a dataset and for writing into a dataset or run folder alike. Returns `root/rel`.
    """
    root = Path(root)
    parts = [p for p in Path(rel).parts if p not in ("", ".")] if rel else []
    path = root
    steps = ([(root, not parts)] if check_root else []) + [(root.joinpath(*parts[: i + 1]), i == len(parts) - 1) for i in range(len(parts))]
    for path, last in steps:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if must_exist:
                raise FormatError(f"{path}: no such file or folder; re-copy the dataset (or rerun the command that writes it)")
            return root.joinpath(*parts)
        except NotADirectoryError:
            raise FormatError(f"{path}: a parent of it is a file, not a folder")
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            raise FormatError(
                f"{path} is a symlink; distill does not follow symlinks inside a dataset or run folder (it could point "
                "outside it): replace it with the real file or folder"
            )
        want = kind if last else "dir"
        ok = stat.S_ISDIR(mode) if want == "dir" else stat.S_ISREG(mode) if want == "file" else stat.S_ISDIR(mode) or stat.S_ISREG(mode)
        if not ok:
            found = ("a folder" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else
                     "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                     "a socket" if stat.S_ISSOCK(mode) else "a special file")
            expected = {"dir": "a folder", "file": "a regular file", "any": "a regular file or folder"}[want]
            raise FormatError(f"{path} is {found}, expected {expected}; a dataset or run folder holds only regular files and folders")
    return path


def walk_plain(folder: str | Path) -> list[str]:
    """Every file below `folder` (sorted '/'-separated relative paths), refusing symlinks and special files anywhere."""
    folder = check_plain(folder, kind="dir", check_root=True)
    out = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            check_plain(root, name, kind="dir" if name in dirs else "file")
        dirs.sort()
        out += [Path(root, name).relative_to(folder).as_posix() for name in files]
    return sorted(out)


def list_files(folder: Path) -> list[str]:
    """Every file below `folder` as sorted '/'-separated relative paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            out.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(out)
