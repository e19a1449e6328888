"""Streaming reader of a logit dataset for stage two: deterministic, splittable across ranks and workers, resumable.

Called by `trainer.train` (training and --eval-data) and `trainer.evaluate` (`distill eval`), on top of the reader API in
`pipeline.format`.

The sample order of an epoch is a pure function of (seed, epoch): shards in a seeded order, cut into blocks of
`--shuffle-shards` consecutive shards, the windows of each block in a seeded order of their own (a full shuffle across
the block: rows of memory-mapped shards cost the same in any order). A capture writes documents in corpus order, so a
shard holds windows of a few documents; blocks keep a batch, and above all the last batches of a run, from drawing on a
handful of files (BENCHMARKS.md: at one shard per block, the seed-to-seed spread of held-out CE was 5% of it).
Rank r of W takes the r-th contiguous 1/W of that sequence, so each rank reads mostly its own blocks and shards fewer
than ranks still split at window granularity. Every rank gets floor(N / W) windows so DDP ranks take the same number
of steps; the last N mod W windows of each epoch's order (< W, different ones each epoch) are skipped. A rank's windows are cut into batches in
order (the last one may be short); DataLoader workers take those batches round-robin, which is the order the DataLoader
hands them back in, so the stream is identical for any --workers. Resume state is (epoch, batches consumed in it): the
restart skips by index without reading anything. Each process verifies a shard the first time it opens it, before any
of its batches is used (so with workers, once per worker): checksums, Arrow schema, and the values a loss relies on
(pipeline.format.values); opening the dataset already checked the manifest, the sizes and the tokenizer files.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from pipeline.common.errors import UserError
from pipeline.format import open_dataset
from pipeline.format.reader import Dataset, Shard
from pipeline.format.values import check_values

IGNORE_INDEX = -100
OPEN_SHARDS = 2  # shards kept open per process; remote shards live in memory, so keep few


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, shuffle: bool = True, part: slice | None = None,
                block_shards: int = 1) -> np.ndarray:
    """The windows of an epoch in order, as (N, 2) rows of (shard, row); only positions `part` of it when given.

    Shards in a seeded order, cut into blocks of about `block_shards` consecutive shards (near-equal blocks); the windows
    of a block in a seeded order of their own, a full shuffle across the block's shards. Each block's order comes from
    its own generator (seed, epoch, its shards), so a rank builds just the blocks its part touches: memory
    O(N / world size + block), not O(N). With block_shards 1 a block is one shard (a within-shard shuffle only).
    """
    n = len(shard_sizes)
    shards = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    blocks = -(-n // max(1, block_shards)) if shuffle else n
    bounds = np.linspace(0, n, blocks + 1).round().astype(np.int64)  # block j: shards[bounds[j]:bounds[j + 1]]
    starts = np.concatenate([[0], np.cumsum(sizes[shards])])[bounds]
    lo, hi = (part.start, part.stop) if part is not None else (0, int(starts[-1]))
    pieces = [np.zeros((0, 2), np.int64)]
    for j in range(blocks):
        a, b = max(lo, int(starts[j])), min(hi, int(starts[j + 1]))
        if a >= b:
            continue
        members = shards[bounds[j]:bounds[j + 1]].tolist()
        ids = np.concatenate([np.stack([np.full(sizes[s], s), np.arange(sizes[s])], axis=1) for s in members]).astype(np.int64)
        if shuffle:  # one shard: the generator (seed, epoch, shard), as before blocks existed
            ids = ids[np.random.default_rng([seed, epoch, *members]).permutation(len(ids))]
        pieces.append(ids[a - starts[j] : b - starts[j]])
    return np.concatenate(pieces)


def rank_slice(n: int, rank: int, world_size: int, drop_remainder: bool = True) -> slice:
    """The contiguous part of an n-long order taken by `rank`: equal parts (dropping n mod W) or, for eval, all of it."""
    if drop_remainder:
        per = n // world_size
        return slice(rank * per, (rank + 1) * per)
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def read_targets(shard: Shard, rows: np.ndarray, kind: str, log_norm_temperature: float | None = None) -> dict[str, torch.Tensor]:
    """Teacher targets of `rows` as loss inputs: teacher_ids (B, T, M) int64, teacher_logprobs (B, T, M) float32, and
    with `log_norm_temperature` (top-k only) teacher_log_norm (B, T) float32, the stored log sum_v p_v^(1/T) that tempers
    the top-k exactly (trainer.losses.buckets).

    The one place that turns stored targets into loss inputs. kind: 'none' (CE only, online teacher), or a stored kind
    ('topk', 'sampled'), decoded from either encoding by the format reader; padded slots have log-prob -inf.
    """
    if kind == "none":
        return {}
    ids, logprobs = shard.sparse_targets(kind, rows)  # (B, T, M) each
    out = {"teacher_ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
           "teacher_logprobs": torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32))}
    if log_norm_temperature is not None and kind == "topk":
        log_norm = shard.log_norm(log_norm_temperature, rows)  # (B, T); train refuses a temperature that is not stored
        if log_norm is None:
            raise UserError(f"shard {shard.name} stores no log-normalizer at temperature {log_norm_temperature:g}")
        out["teacher_log_norm"] = torch.from_numpy(log_norm)
    return out


def stored_target_kind(ds: Dataset) -> str:
    """The dataset's default target kind (its first stored one), or 'none' when it stores only target log-probs."""
    return ds.target_kinds[0] if ds.target_kinds else "none"


class WindowReader(torch.utils.data.IterableDataset):
    """Batches of windows for one rank: dicts of tensors plus their position ('epoch', 'batch_in_epoch').

    Iterates forever (training) or for `epochs` epochs. `advance(batch)` after consuming a batch; `state_dict()` is then
    the position after it.
    """

    def __init__(
        self,
        data: str | Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: int | None = None,
        targets: str = "topk",
        hidden_layers: tuple[int, ...] = (),
        verify: bool = True,
        log_norm_temperature: float | None = None,
        block_shards: int = 1,
    ):
        self.ds = data if isinstance(data, Dataset) else open_dataset(data)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.epochs, self.targets, self.verify = shuffle, epochs, targets, verify
        self.block_shards = max(1, int(block_shards))  # shards whose windows are shuffled together (epoch_order)
        self.max_open = max(OPEN_SHARDS, self.block_shards)  # a block's shards stay open while it is read
        self.hidden_layers = tuple(hidden_layers)
        self.log_norm_temperature = log_norm_temperature  # top-k: also read the stored log-normalizer at this T
        self.sizes = [s.windows for s in self.ds.shards]
        n = sum(self.sizes)
        part = rank_slice(n, rank, world_size, drop_remainder=shuffle)
        self.windows_per_rank = len(range(n)[part])
        if self.windows_per_rank == 0:
            raise UserError(
                f"dataset {self.ds.url} has {n} windows, too few for {world_size} processes; use fewer processes or more data"
            )
        self.batches_per_epoch = -(-self.windows_per_rank // batch_size)
        self.epoch, self.batch_in_epoch = 0, 0
        self._open: OrderedDict[int, dict] = OrderedDict()
        self._verified: set[int] = set()

    # --- position and resume

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed, "world_size": self.world_size,
            "batch_size": self.batch_size, "manifest_sha256": self.ds.manifest_sha256, "block_shards": self.block_shards,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("seed", self.seed), ("world_size", self.world_size), ("batch_size", self.batch_size),
                         ("manifest_sha256", self.ds.manifest_sha256), ("block_shards", self.block_shards)):
            was = state.get(key, 1 if key == "block_shards" else None)  # checkpoints from before --shuffle-shards: 1
            if was != now:
                what = {"world_size": "processes", "block_shards": "--shuffle-shards"}.get(key, key.replace("_", " "))
                raise UserError(
                    f"checkpoint was written with {what} {was!r} but this run has {now!r}; resume with the same "
                    "dataset, seed, batch size, --shuffle-shards and number of processes, or start a new --out"
                )
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def advance(self, batch: dict) -> None:
        """Record that `batch` was consumed: the next state_dict() resumes right after it."""
        self.epoch, self.batch_in_epoch = batch["epoch"], batch["batch_in_epoch"] + 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # --- order

    def rank_order(self, epoch: int) -> np.ndarray:
        """(windows_per_rank, 2) (shard, row) pairs this rank reads in `epoch`, in order."""
        part = rank_slice(sum(self.sizes), self.rank, self.world_size, drop_remainder=self.shuffle)
        return epoch_order(self.sizes, self.seed, epoch, self.shuffle, part, self.block_shards)

    def positions(self):
        """(epoch, batch_in_epoch, (B, 2) rows) from the current position to the end of the stream."""
        epoch, start = self.epoch, self.batch_in_epoch
        while self.epochs is None or epoch < self.epochs:
            order = self.rank_order(epoch)
            self.plan_prefetch(epoch, order[start * self.batch_size :])
            for b in range(start, self.batches_per_epoch):
                yield epoch, b, order[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, start = epoch + 1, 0

    def plan_prefetch(self, epoch: int, rest: np.ndarray) -> None:
        """A URL dataset: tell its local cache which shards come next (the rest of this epoch, then the next epoch), so
        they are fetched ahead of use (pipeline/format/cache.py). Consecutive repeats are dropped."""
        if getattr(self.ds, "cache", None) is None:
            return
        seq = np.concatenate([rest[:, 0], self.rank_order(epoch + 1)[:, 0]]) if self.epochs is None or epoch + 1 < self.epochs else rest[:, 0]
        if len(seq):
            self.ds.cache.plan(seq[np.r_[True, seq[1:] != seq[:-1]]].tolist())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            for k, (epoch, b, rows) in enumerate(self.positions()):
                if k % n_workers == worker:  # the DataLoader takes batches from its workers round-robin, in this order
                    yield self.read_batch(rows) | {"epoch": epoch, "batch_in_epoch": b}
        except UserError as e:
            # Raised in a worker, DataLoader would wrap it in a traceback; hand it over as data so the loop raises it clean.
            yield {"error": e}

    # --- reading

    def shard(self, i: int) -> dict:
        """An open shard (columns memory-mapped; remote ones in memory), verified the first time this process opens it."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        shard = self.ds.open_shard(i)  # a view of its own, so dropping it frees a remote shard's memory
        if self.verify and i not in self._verified:
            # before any batch of this shard is used: its files, then the values a loss relies on (ids below the
            # vocabulary, 0/1 masks, log-probs neither NaN nor above 0, sorted top-k, counts that add up)
            shard.verify_checksums(hidden=bool(self.hidden_layers))
            check_values(shard, kinds=[] if self.targets == "none" else [self.targets])
            self._verified.add(i)
        self._open[i] = {"shard": shard, "hidden": {layer: shard.hidden(layer) for layer in self.hidden_layers}}
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return self._open[i]

    def read_batch(self, rows: np.ndarray) -> dict:
        """Tensors for (B, 2) (shard, row) pairs, in that order."""
        parts = []
        for s in dict.fromkeys(rows[:, 0].tolist()):  # shards in order of first appearance
            picked = np.nonzero(rows[:, 0] == s)[0]
            parts.append((picked, self.read_rows(s, rows[picked, 1])))
        if len(parts) == 1:
            return parts[0][1]
        where = np.argsort(np.concatenate([p for p, _ in parts]), kind="stable")
        return _concat([b for _, b in parts], torch.from_numpy(where))

    def read_rows(self, i: int, rows: np.ndarray) -> dict:
        opened = self.shard(i)
        shard = opened["shard"]
        mask = torch.from_numpy(shard.column("loss_mask")[rows].astype(np.bool_))  # (B, T)
        labels = torch.from_numpy(shard.column("labels")[rows].astype(np.int64))  # (B, T)
        batch = {
            "window_index": torch.from_numpy(shard.column("window_index")[rows].astype(np.int64)),  # (B,)
            "input_ids": torch.from_numpy(shard.column("input_ids")[rows].astype(np.int64)),  # (B, T)
            "labels": labels.masked_fill(~mask, IGNORE_INDEX),  # (B, T), -100 where there is no next token
            "loss_mask": mask,
            # (B, T): restart at 0 at each packed example (format 2); 0..T-1 in every window of a format-1 dataset
            "position_ids": torch.from_numpy(np.ascontiguousarray(shard.column("position_ids", rows), dtype=np.int64)),
        }
        batch |= read_targets(shard, rows, self.targets, self.log_norm_temperature)
        if self.hidden_layers:
            batch["hidden"] = {  # (B, T, H) float16; 0 where a dataset stores only trained positions (loss_mask 0 there)
                layer: torch.from_numpy(shard.hidden_windows(layer, rows, arr)) for layer, arr in opened["hidden"].items()
            }
        return batch


# Padding of target slots, when shards give different widths M (sampled targets have as many as the rows need).
_PAD = {"teacher_ids": 0, "teacher_logprobs": float("-inf")}


def _concat(parts: list[dict], where: torch.Tensor) -> dict:
    """Concatenate per-shard batch dicts along the batch dim, then put rows back in order (row i = cat[where[i]])."""
    out = {}
    for key, value in parts[0].items():
        if isinstance(value, dict):
            out[key] = _concat([p[key] for p in parts], where)
            continue
        values = [p[key] for p in parts]
        if key in _PAD:
            width = max(v.shape[-1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=_PAD[key]) for v in values]
        out[key] = torch.cat(values)[where]
    return out


def make_loader(reader: WindowReader, workers: int, seed: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a reader: batches are made by the reader (batch_size=None), workers split them round-robin.

    Its own generator keeps the DataLoader from drawing from the global torch RNG (which a resumed run restores).
    Workers of a dataset that is not on a local disk are spawned, not forked: a forked worker inherits the parent's
    object-storage client (event loop, connections) and its locks mid-use, which can hang it.
    """
    remote = workers > 0 and not reader.ds.is_local
    return torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(seed),
                                       multiprocessing_context="spawn" if remote else None)


def check_batch(batch: dict) -> dict:
    """Raise an error a reader handed over as data (see WindowReader.__iter__)."""
    if "error" in batch:
        raise batch["error"]
    return batch
