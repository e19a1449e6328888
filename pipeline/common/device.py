"""Device and dtype resolution shared by both stages (`--device auto|cpu|cuda[:N]`, `--dtype auto|...`)."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when available, else CPU. Under torchrun, plain "cuda" (and auto) means this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but none is available; pass --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)
