"""Processes and devices for stage two: torchrun's environment, the process group, device and compute dtype, reductions.

Called by `trainer.train` and `trainer.evaluate`. One process (no torchrun) is world size 1 and never touches
torch.distributed, so every helper here is a no-op there.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.common.errors import UserError
from pipeline.common.device import resolve_device


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device_dtype(device: str, dtype: str, local_rank: int) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None = plain float32). auto: bfloat16 on CUDA with bf16 support, else float32."""
    dev = resolve_device(device, local_rank)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return dev, (torch.bfloat16 if dtype == "bfloat16" else None)


def init_distributed(world_size: int, device: torch.device) -> None:
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (in place, also returned)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    """`obj` of every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_error(problems: list[str]) -> None:
    """Raise the same UserError on every rank when any rank found problems, so no rank is left waiting in a collective."""
    everyone = all_gather_objects(problems)
    merged = list(dict.fromkeys(p for rank_problems in everyone for p in rank_problems))
    if merged:
        raise UserError("; ".join(merged))


def set_cpu_threads(threads: int | None, device: torch.device) -> int | None:
    """On the CPU, use `threads` intra-op threads (default 1; see TrainConfig.threads for why). Returns the number set
    (None on other devices, where the CPU only feeds the accelerator)."""
    if device.type != "cpu":
        return None
    torch.set_num_threads(threads)
    return threads
