"""A training run's folder: one writer at a time, no symlinks in it, leftovers of killed runs removed, and the paths a
resume compares taken by what they name rather than how they were typed. Called by `trainer.train` (rank 0 writes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.common.errors import UserError, describe, os_problem
from pipeline.common.identity import path_identity
from pipeline.common.outdir import TEMP_MARK, lock_folder, make_out_folder, refuse_links, remove_leftovers

from .checkpoint import CHECKPOINTS, list_checkpoints
from .config import TrainConfig

# Config fields that name files or folders: a resume compares their contents (`identities` in train_config.json).
PATH_FIELDS = ("student", "student_config", "online_teacher")


def take_run_folder(out: Path) -> tuple[int | None, list[str]]:
    """Create and lock `out` (exclusive), refuse symlinks or special files in it, and delete temp leftovers of killed
    runs (top level and checkpoints/). Returns (lock handle, problems): problems are broadcast so every rank stops."""
    lock = None
    try:  # an error here is returned, not raised: under torchrun the other ranks wait for rank 0's answer
        make_out_folder(out)
        lock = lock_folder(out, what="--out")
        refuse_links(out)
        remove_leftovers(out, (CHECKPOINTS,))
    except UserError as e:
        return lock, [str(e)]
    except OSError as e:  # read-only or forbidden folder, disk full: one line
        return lock, [f"--out {out}: {os_problem(e) or describe(e)}"]
    return lock, []


def run_identities(cfg: TrainConfig) -> dict:
    """What each path field names (content hashes of local files and folders; hub ids as given)."""
    return {k: path_identity(getattr(cfg, k)) for k in PATH_FIELDS}


def saved_with_same_paths(saved: dict, cfg: TrainConfig) -> dict:
    """The saved run config with path fields replaced by today's spelling where both name the same contents, so
    `trajectory_diff` reports only real changes (`../fx/student` and `/abs/fx/student` are one student)."""
    config = dict(saved.get("config", {}))
    identities = saved.get("identities") or {}
    for k in PATH_FIELDS:
        now = getattr(cfg, k)
        if k in config and config[k] != now and k in identities and identities[k] == path_identity(now):
            config[k] = now
    return config


def prune_checkpoints(out: Path, keep_last: int, resumed_step: int) -> None:
    """Keep at most `keep_last` complete checkpoints (a run killed between saving one and deleting the oldest left one
    too many); the one being resumed from is never deleted."""
    found = list_checkpoints(out)
    for step, path in found[:-keep_last] if keep_last else []:
        if step != resumed_step and TEMP_MARK not in path.name:
            shutil.rmtree(path, ignore_errors=True)
