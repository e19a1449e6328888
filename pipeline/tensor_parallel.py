"""Tensor-parallel capture (`--tp N` under torchrun): N processes hold one teacher, split by transformers' tp_plan.

Ranks [g*N, (g+1)*N) form group g (`pipeline.head.tp_groups`). Each group is its own torch.distributed world (a
process group over its N ranks, on a prefix of torchrun's store), so transformers' tensor parallelism sees exactly the N
processes that share the weights, and groups never wait on each other: like ranks today they coordinate only through
the shard markers in the output folder. The group captures as rank g of world_size/N did (shard i -> group i % groups);
its first rank (the writer) plans the work, reads the windows and writes; the others never touch `--out`: they receive
the writer's capture settings and every batch (`send_settings`, `send` / `receive`) and run the same forward and targets
in step, because each forward (and each chunk of the head) is a collective of the whole group.
Called by `pipeline.precompute`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from .common.errors import UserError
from .head import tp_groups

GROUP_TIMEOUT_HOURS = 24
BATCH_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")  # what a follower needs of a batch: (B, T) each


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel capture: global `rank` of `world_size`, `tp` ranks per group."""

    rank: int
    world_size: int
    tp: int
    device: object = None  # torch.device of the collectives, set by `join`

    @property
    def index(self) -> int:
        """The group's number: it takes the shards rank `index` of `count` would take."""
        return tp_groups(self.rank, self.world_size, self.tp)[0]

    @property
    def count(self) -> int:
        return tp_groups(self.rank, self.world_size, self.tp)[1]

    @property
    def writer(self) -> bool:
        """The group's first rank plans, reads and writes; the others compute only."""
        return tp_groups(self.rank, self.world_size, self.tp)[2] == 0

    def join(self, device) -> None:
        """Form this group's process group (gloo on CPU, NCCL on CUDA) before the teacher loads."""
        import torch
        import torch.distributed as dist

        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError(f"--tp {self.tp} splits the teacher across processes started by torchrun (it sets MASTER_ADDR "
                            f"and MASTER_PORT); run: torchrun --nproc-per-node {self.tp} -m pipeline.cli precompute ... --tp {self.tp}")
        if dist.is_initialized():
            raise UserError(f"--tp {self.tp}: torch.distributed is already initialized in this process; run precompute "
                            "in a process of its own (torchrun ... -m pipeline.cli precompute)")
        if device.type == "cpu" and torch.cuda.is_available():  # transformers splits over the machine's accelerator
            raise UserError(f"--tp {self.tp} --device cpu on a machine with GPUs: transformers would place the split teacher "
                            "on the GPUs; pass --device cuda, or hide them (CUDA_VISIBLE_DEVICES=) to capture on CPU")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun's store (its agent's, or rank 0's), with a prefix per group: each group is a world of its own
        store, _, _ = next(dist.rendezvous("env://", rank=self.rank, world_size=self.world_size))
        member = tp_groups(self.rank, self.world_size, self.tp)[2]
        backend = "nccl" if device.type == "cuda" else "gloo"
        # a long timeout: followers wait in a broadcast while their writer tokenizes the corpus (once, maybe hours);
        # a rank that fails ends the others through torchrun, not through this timeout
        dist.init_process_group(backend, store=dist.PrefixStore(f"distill-tp-group-{self.index}", store),
                                rank=member, world_size=self.tp, timeout=timedelta(hours=GROUP_TIMEOUT_HOURS),
                                **({"device_id": device} if device.type == "cuda" else {}))
        self.device = device

    # --- the writer's messages to its group: capture settings, batches, stop --------------------------------------
    # a header (kind, a, b, c) then the payload: SETTINGS (bytes, -, -) JSON; BATCH (first window, B, T) the
    # BATCH_KEYS arrays stacked as int64 (4, B, T); STOP ends the follower's loop
    STOP, BATCH, SETTINGS = 0, 1, 2

    def _header(self, *values: int) -> None:
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.tensor(list(values) + [0] * (4 - len(values)), dtype=torch.int64, device=self.device), src=0)

    def send_settings(self, settings: dict) -> None:
        """Writer: the capture settings the targets are computed with (final once the data is read: e.g. positions)."""
        import torch
        import torch.distributed as dist

        raw = json.dumps(settings, sort_keys=True).encode()
        self._header(self.SETTINGS, len(raw))
        dist.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device), src=0)

    def send(self, first_window: int, w: dict) -> dict:
        """Writer: broadcast batch `w` (the arrays of BATCH_KEYS, (B, T) each) starting at window `first_window`."""
        import torch
        import torch.distributed as dist

        B, T = w["input_ids"].shape
        self._header(self.BATCH, first_window, B, T)
        stacked = np.stack([np.asarray(w[k], dtype=np.int64) for k in BATCH_KEYS])  # (4, B, T)
        dist.broadcast(torch.from_numpy(stacked).to(self.device), src=0)
        return w

    def receive(self) -> tuple[int, dict] | dict | None:
        """Follower: the writer's next message: (first_window, batch), the settings (a dict), or None when it is done."""
        import torch
        import torch.distributed as dist

        header = torch.empty(4, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        kind, a, B, T = (int(x) for x in header.cpu())
        if kind == self.STOP:
            return None
        if kind == self.SETTINGS:
            raw = torch.empty(a, dtype=torch.uint8, device=self.device)
            dist.broadcast(raw, src=0)
            return json.loads(bytes(raw.cpu().numpy()))
        stacked = torch.empty(len(BATCH_KEYS), B, T, dtype=torch.int64, device=self.device)
        dist.broadcast(stacked, src=0)
        arrays = stacked.cpu().numpy()
        return a, {k: arrays[i] for i, k in enumerate(BATCH_KEYS)}

    def finish(self) -> None:
        """Writer: tell the followers there is no more batch. Every rank then leaves its process group."""
        if self.writer:
            self._header(self.STOP)
        self.leave()

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


    def describe(self, model) -> str:
        """A line for the log: which ranks hold the teacher and how much of it stays on this one."""
        local = total = 0
        for p in model.parameters():
            total += p.numel()
            local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()  # a DTensor holds a slice
        first = self.index * self.tp
        return (f"--tp {self.tp}: ranks {first}-{first + self.tp - 1} hold the teacher (group {self.index} of {self.count}); "
                f"each holds {local / max(total, 1):.0%} of its {total:,} parameters")

    def reraise(self, e: RuntimeError):
        """A collective that failed because another rank of the group ended (its own error is printed by it): one line
        here instead of a second traceback. Any other error is raised as it is."""
        import torch.distributed as dist

        text = str(e)
        if isinstance(e, getattr(dist, "DistBackendError", ())) or "closed by peer" in text or "reset by peer" in text:
            first = self.index * self.tp
            raise UserError(f"--tp {self.tp}: another rank of group {self.index} (ranks {first}-{first + self.tp - 1}) "
                            "stopped, so this one cannot go on; its error is printed above") from None
        raise e
