"""`distill train --fsdp`: the student, its projections and the optimizer sharded across ranks with PyTorch FSDP2.

Called by `trainer.train` when --fsdp is set. Each transformer block is its own FSDP unit (all-gathered just before its
forward, freed after); the `DistillStep` wrapping the student is the root unit, which holds what is left (embeddings,
final norm, output head, hidden-state projections). The root has to be the DistillStep, not the student: the fused loss
reads the output head's weight outside the student's forward, and the root's pre-forward hook is what gathers it.

Mixed precision is FSDP's own: parameters gathered in --dtype (bfloat16) for compute, gradients reduced in float32,
the sharded master weights and the optimizer state stay float32. Checkpoints are sharded (trainer.checkpoint): each rank
writes its local shards as safetensors, and the layout (`fsdp.json`) says what they are; a resume needs the same number
of processes, which the data reader already requires. The final student in OUT/model/ is gathered into one ordinary
Hugging Face folder.

Without torchrun, --fsdp runs 1-way: a process group of one (everything works, nothing is sharded).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.common.errors import UserError

LAYOUT = "fsdp.json"  # in a checkpoint folder: what the per-rank shard files hold
SHARDS = "shards"


def init_single_process_group(device: torch.device) -> None:
    """A process group of one, for --fsdp without torchrun (FSDP needs a group even when nothing is split)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The student's transformer blocks: modules of the classes the model names in `_no_split_modules` (every Hugging
    Face decoder does); else the longest nn.ModuleList. Each becomes one FSDP unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(step_fn: nn.Module, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, world: int):
    """Shard `step_fn` (student + projections) in place across the `world` ranks; returns the device mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    # param_dtype None keeps float32 compute; gradients are always reduced in float32
    policy = dict(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in block_modules(model):
        fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(**policy))
    # The root's inputs include float32 teacher log-probs and hidden states: they must not be cast to bfloat16.
    fully_shard(step_fn, mesh=mesh, mp_policy=MixedPrecisionPolicy(**policy, cast_forward_inputs=False))
    return mesh


@contextmanager
def gradient_sync(step_fn, enabled: bool):
    """FSDP's no_sync: a micro-batch before the last of an optimizer step keeps its gradients unreduced."""
    step_fn.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        step_fn.set_requires_gradient_sync(True)


@contextmanager
def gathered(step_fn):
    """The root unit's parameters gathered, so the student can run outside DistillStep (evaluation); the blocks gather
    themselves in their own forward."""
    step_fn.unshard()
    try:
        yield
    finally:
        step_fn.reshard()


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over sharded gradients: the global norm (a plain tensor, the same on every rank), then the clip."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().contiguous()


def local_tensors(step_fn: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """This rank's part of the weights and optimizer state as flat {name: tensor} (safetensors keys), and the layout.

    Weights: `weights.NAME` for every parameter (tied ones once) and buffer. Optimizer: `optimizer.I.KEY` for parameter
    index I of the optimizer's order. The layout records the local shape and dtype of each, the parameters' names and
    global shapes in optimizer order (so a resume can refuse a checkpoint of another model) and the param groups
    (hyperparameters, the parameters as indices)."""
    tensors, layout = {}, {"tensors": {}}
    for name, p in step_fn.named_parameters():
        tensors[f"weights.{name}"] = _local(p)
    for name, b in step_fn.named_buffers():
        tensors[f"weights.{name}"] = b.detach().contiguous()
    names = {id(p): n for n, p in step_fn.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{i}.{key}"] = _local(value)
    for key, value in tensors.items():  # this rank's shapes (every rank's file says its own)
        layout["tensors"][key] = {"local_shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    layout["param_names"] = [names[id(p)] for p in params]
    layout["param_shapes"] = [list(p.shape) for p in params]
    layout["param_groups"] = sd["param_groups"]
    return tensors, layout


def write_rank_shards(folder: Path, step_fn, optimizer, rank: int, world: int) -> dict:
    """Write this rank's safetensors into `folder/shards/` (a temp name, fsynced, renamed); return the layout."""
    from safetensors.torch import save_file

    tensors, layout = local_tensors(step_fn, optimizer)
    path = Path(folder) / SHARDS / shard_name(rank, world)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return layout


def shard_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / LAYOUT).is_file()


def load_rank_shards(folder: Path, step_fn, optimizer, rank: int, world: int) -> None:
    """Put this rank's saved shards back into the sharded weights and the optimizer, in place. Refuses a checkpoint
    written by another number of processes or for another model, naming what differs."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    folder = Path(folder)
    layout = json.loads((folder / LAYOUT).read_text())
    if layout.get("world_size") != world:
        raise UserError(f"checkpoint {folder} was written by {layout.get('world_size')} --fsdp processes but this run has "
                        f"{world}; resume with the same number of processes, or start a new --out")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in step_fn.named_parameters()}
    now = ([names[id(p)] for p in params], [list(p.shape) for p in params])
    if (layout["param_names"], layout["param_shapes"]) != now:
        raise UserError(f"checkpoint {folder} holds another model's parameters than this run's student; resume with the "
                        "same --student/--student-config and --hidden-* settings, or start a new --out")
    saved = load_file(str(folder / SHARDS / shard_name(rank, world)))
    with torch.no_grad():
        for name, t in list(step_fn.named_parameters()) + list(step_fn.named_buffers()):
            local = _local_view(t)
            value = saved[f"weights.{name}"]
            if value.shape != local.shape:
                raise UserError(f"checkpoint {folder}: {name} has local shape {tuple(value.shape)} on rank {rank} but "
                                f"this run shards it as {tuple(local.shape)}; resume with the same processes and model")
            local.copy_(value)
    state = {}
    for key, value in saved.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            p = params[int(i)]
            if isinstance(p, DTensor) and name != "step":
                value = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
            state.setdefault(int(i), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in layout["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _local_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage is this rank's part of `t` (writing it writes the sharded parameter)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The student's whole state dict on rank 0's CPU (empty elsewhere); a collective: every rank calls it, in the same
    order. Tied parameters gather once and stay one tensor."""
    out, done = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in done:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            done[id(t)] = full.detach().cpu() if rank == 0 else None
        if rank == 0:
            out[name] = done[id(t)]
    return out


def plain_student(model: nn.Module, state: dict[str, torch.Tensor], trust_remote_code: bool = False) -> nn.Module:
    """An ordinary (unsharded) copy of the student holding `state`, built without allocating weights twice, for
    save_pretrained."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    plain.load_state_dict(state, assign=True, strict=True)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain


def student_from_checkpoint(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """The student's architecture from a sharded checkpoint's config.json (weights: `load_rank_shards` after sharding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
