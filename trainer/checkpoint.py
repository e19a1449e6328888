"""Checkpoints of a training run: written atomically, the last K kept, found again by `--resume`.

Called by `trainer.train`. Layout: `OUT/checkpoints/step-000100/` holds the student and its tokenizer as `save_pretrained`
writes them (so a checkpoint is itself a loadable model) and `state.pt` (optimizer, scheduler, reader position, projections, RNG states
of every rank, step). Everything is written under a `.tmp-PID` name, fsynced, then renamed: a run killed mid-save leaves
only a temp folder, which the next run deletes. `state.pt` holds only tensors and plain containers, so it loads with
`torch.load(weights_only=True)`.

An --fsdp run writes sharded checkpoints instead (`save_sharded_checkpoint`): the student's config.json and tokenizer,
`shards/rank-R-of-W.safetensors` (each rank's part of the weights, projections and optimizer state, written by that rank),
`fsdp.json` (what the shards hold; trainer/fsdp.py) and `state.pt` without the optimizer (scheduler, reader, RNG, step).
Every rank writes into one temp folder (a file system all ranks share); rank 0 renames it once all are done. Such a
checkpoint is resumed by --fsdp with the same number of processes; it is not itself a loadable model (OUT/model/ is).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.common.files import remove_temp_files

CHECKPOINTS = "checkpoints"
STATE = "state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first; temp folders of killed saves are not listed."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(out: Path, step: int, model, state: dict, keep_last: int, tokenizer=None) -> Path:
    """Write model (+ tokenizer) + state for `step` atomically, then delete all but the newest `keep_last` checkpoints.
    With the tokenizer a checkpoint loads on its own (`from_pretrained`, `distill eval --student CKPT`)."""
    final = checkpoint_dir(out, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_temp_files(final.parent)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    torch.save(state, tmp / STATE)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a finished run resumed): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(out: Path, step: int, model, state: dict, keep_last: int, write_shards, rank: int,
                            world: int, tokenizer=None) -> Path:
    """A sharded checkpoint of `step`; every rank calls it. `write_shards(folder)` writes this rank's shards and returns
    the layout (trainer.fsdp.write_rank_shards); rank 0 adds config, tokenizer, layout and `state`, then renames."""
    from .distributed import barrier
    from .fsdp import LAYOUT

    final = checkpoint_dir(out, step)
    tmp = final.with_name(f"{final.name}.tmp-sharded")  # one name for all ranks (a pid would differ per rank)
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_temp_files(final.parent)
        tmp.mkdir()
    barrier()
    layout = write_shards(tmp)
    barrier()
    if rank == 0:
        model.config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_json(tmp / LAYOUT, layout | {"world_size": world, "step": step})
        torch.save(state, tmp / STATE)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def load_state(folder: Path, device: str | torch.device = "cpu") -> dict:
    return torch.load(Path(folder) / STATE, map_location=device, weights_only=True)


def rng_state() -> dict:
    """Every random number generator this process uses, as tensors and plain containers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached": cached},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
