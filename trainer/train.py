"""Stage two, top-down: `train(cfg)` streams a logit dataset into a student, checkpoints, resumes exactly, evaluates.

dataset + run folder + student (every refusal before any step) → model, losses, optimizer → resume point → loop
(micro-batches, accumulation, clipping, AdamW, warmup + cosine/constant/wsd) → checkpoints, metrics, evaluation → the saved student.
Runs alone or under torchrun (DDP: each rank reads its own part of the data; only rank 0 writes; --fsdp: the student and
optimizer sharded too, trainer/fsdp.py, and every rank writes its part of a checkpoint). Called by
`distill train` (trainer/cli.py) and from Python; returns the final metrics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pipeline.common.errors import UserError
from pipeline.common.files import write_json_atomic
from pipeline.format import open_dataset
from pipeline.common.outdir import unlock_folder

from .losses.config import LossConfig
from .losses.hidden import make_projections
from .checkpoint import (CHECKPOINTS, checkpoint_dir, list_checkpoints, load_state, rng_state, save_checkpoint,
                         save_sharded_checkpoint, seed_everything, set_rng_state)
from .config import TrainConfig, effective_warmup, steps_extensible, trajectory_diff, warmup_note
from .data import WindowReader, make_loader, stored_target_kind
from .distributed import (all_gather_objects, all_reduce_sum, barrier, broadcast_error, close_distributed, dist_env,
                          init_distributed, resolve_device_dtype, set_cpu_threads)
from .evaluate import evaluate_batches, finish_metrics, metric_sums
from .fsdp import (clip_grad_norm, full_state_dict, gathered, gradient_sync, init_single_process_group,
                   is_sharded_checkpoint, load_rank_shards, plain_student, shard, student_from_checkpoint,
                   write_rank_shards)
from .model_card import model_card, save_final_model
from .online import load_online_teacher, online_teacher_logits
from .progress import Progress, make_reporter
from .run_folder import prune_checkpoints, run_identities, saved_with_same_paths, take_run_folder
from .student import (DistillStep, compatibility_problems, dataset_tokenizer, fused_blocker, load_pretrained, load_student,
                      load_tokenizer, resolve_layer_map)

TRAIN_CONFIG, METRICS, RUN = "train_config.json", "metrics.jsonl", "run.json"


def train(cfg: TrainConfig) -> dict:
    cfg.resolve()
    # --- processes, device ------------------------------------------------------------------------------------------
    rank, world, local_rank = dist_env()
    device, amp_dtype = resolve_device_dtype(cfg.device, cfg.dtype, local_rank)
    init_distributed(world, device)
    if cfg.fsdp and world == 1:
        init_single_process_group(device)  # --fsdp without torchrun: 1-way
    set_cpu_threads(cfg.threads, device)
    _quiet_transformers()

    # --- dataset, run folder, student: every refusal happens here, before any step ---------------------------------
    ds = open_dataset(cfg.data, **cfg.data_options())  # a URL: shards fetched ahead into the local cache
    eval_ds = open_dataset(cfg.eval_data, **cfg.data_options()) if cfg.eval_data else None
    out = Path(cfg.out)
    lock, problems = take_run_folder(out) if rank == 0 else (None, [])  # one writer; no symlinks; leftovers removed
    broadcast_error(problems)
    ckpt = resume_point(out, cfg, ds)
    if ckpt is not None and is_sharded_checkpoint(ckpt) != cfg.fsdp:
        kind = "without" if cfg.fsdp else "with"
        raise UserError(f"checkpoint {ckpt} was written {kind} --fsdp; resume {kind} it, or start a new --out")
    if ckpt is not None and cfg.fsdp:  # the architecture from its config.json; the weights after sharding
        model, tokenizer = student_from_checkpoint(ckpt, cfg.trust_remote_code), None
        if cfg.student:
            tokenizer = load_tokenizer(cfg.student, cfg.trust_remote_code)
    elif ckpt is not None:  # the checkpoint is a complete model folder; the tokenizer is still the original student's
        model, tokenizer = load_pretrained(str(ckpt), cfg.trust_remote_code), None
        if cfg.student:
            tokenizer = load_tokenizer(cfg.student, cfg.trust_remote_code)
    else:
        model, tokenizer = load_student(cfg, ds)
    problems = compatibility_problems(model, tokenizer, ds)
    layer_map, layer_problems = resolve_layer_map(cfg, model, ds)
    targets, target_problems = target_kind(cfg, ds)
    log_norm_t, temperature_problems = stored_temperature(cfg, ds, targets, rank)
    problems += layer_problems + target_problems + temperature_problems
    if eval_ds is not None:
        problems += [f"--eval-data: {p}" for p in compatibility_problems(model, tokenizer, eval_ds)]
    online_teacher = None  # a model run at every step (--online-teacher); the dataset's teacher is only a record
    if cfg.online_teacher:
        online_teacher, teacher_problems = load_online_teacher(cfg.online_teacher, ds, device, amp_dtype, cfg.trust_remote_code)
        problems += teacher_problems
    broadcast_error(problems)
    fused = cfg.loss_impl == "fused" and fused_blocker(model) is None

    # --- model, losses, optimizer, schedule --------------------------------------------------------------------------
    seed_everything(cfg.seed)  # same projection init on every rank
    d_teacher = next((x.width for x in ds.capture.hidden_layers if x.index in layer_map.values()), 0)
    projections = make_projections(layer_map, model.config.hidden_size, d_teacher) if layer_map else nn.ModuleDict()
    model.to(device).train()
    projections.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # loss = alpha * CE + (1 - alpha) * T^2 * KD(teacher, student) [+ hidden_weight * hidden loss]; KD = --loss over the
    # buckets of --tail (trainer/losses), in float32, averaged over the positions that have a next token
    loss_cfg = LossConfig(loss=cfg.loss, tail=cfg.tail, alpha=cfg.alpha, temperature=cfg.temperature, beta=cfg.beta,
                          chunk_size=cfg.chunk_size)
    step_fn = DistillStep(model, projections, loss_cfg, layer_map, cfg.hidden_weight, cfg.hidden_loss, fused)
    run_step = step_fn  # what the loop calls: the step itself (sharded in place by --fsdp), or its DDP wrapper
    if cfg.fsdp:
        shard(step_fn, model, device, amp_dtype, world)
    elif world > 1:
        run_step = nn.parallel.DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(step_fn, cfg, device)
    reader = WindowReader(ds, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, targets=targets,
                          hidden_layers=tuple(sorted(set(layer_map.values()))), log_norm_temperature=log_norm_t,
                          block_shards=cfg.shuffle_shards)
    total_steps = cfg.steps or max(1, cfg.epochs * reader.batches_per_epoch // cfg.grad_accum)
    lr_factor = lr_schedule(cfg.schedule, cfg.warmup, total_steps, cfg.decay_steps)
    note = warmup_note(cfg.warmup, total_steps) if rank == 0 and not cfg.quiet else None  # said after step 1 (a
    # refusal at the first batch stays one line)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    keep_at = stable_end(cfg.schedule, cfg.warmup, total_steps, cfg.decay_steps)  # wsd: a checkpoint kept for extensions
    eval_reader = None
    if eval_ds is not None:
        eval_reader = WindowReader(eval_ds, cfg.batch_size, rank=rank, world_size=world, shuffle=False, epochs=1,
                                   targets=stored_target_kind(eval_ds))

    # --- resume or start ---------------------------------------------------------------------------------------------
    step = 0
    if ckpt is not None:
        state = load_state(ckpt)
        reader.load_state_dict(state["reader"])  # refuses another dataset, seed, batch size or process count
        if cfg.fsdp:  # weights, projections and optimizer state: this rank's shards
            load_rank_shards(ckpt, step_fn, optimizer, rank, world)
        else:
            optimizer.load_state_dict(state["optimizer"])
            projections.load_state_dict(state["projections"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank])
        step = int(state["step"])
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # this total's value (an extension's)
            group["lr"] = base * lr_factor(step)
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs across ranks; the weights above are the same everywhere
    if rank == 0:
        forget_abandoned(out, cfg, step)
        start_run_folder(out, cfg, ds, step)
    barrier()

    # --- loop --------------------------------------------------------------------------------------------------------
    loader = iter(make_loader(reader, cfg.workers, cfg.seed, pin_memory=device.type == "cuda"))
    progress = Progress(total_steps, step, enabled=rank == 0 and not cfg.quiet, bar=None if cfg.progress else False,
                        log_seconds=cfg.log_seconds)  # a bar on a terminal, plain lines elsewhere
    report = make_reporter(cfg.report_to, out, asdict(cfg)) if rank == 0 else None
    params = [p for p in step_fn.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # token-weighted loss, ce, kd, hidden; tokens; inputs
    windows, last, t_log = [], {}, time.perf_counter()
    while step < total_steps:
        for micro in range(cfg.grad_accum):
            batch = next(loader)
            if "error" in batch:  # a reader error handed over as data (see WindowReader.__iter__)
                del loader  # stop the workers now, not when the traceback is collected
                raise batch["error"]
            inputs = model_inputs(batch, device)
            if online_teacher is not None:
                inputs["teacher_logits"] = online_teacher_logits(online_teacher, inputs["input_ids"], amp_dtype,
                                                                 inputs.get("position_ids"))  # (B, T, V)
            if cfg.fsdp:
                sync = gradient_sync(step_fn, micro == cfg.grad_accum - 1)
            else:
                sync = run_step.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
            with sync:
                with autocast():
                    res = run_step(**inputs)
                (res["loss"] / cfg.grad_accum).backward()
            reader.advance(batch)
            n = res["n_tokens"].double()
            sums += torch.stack([res["loss"].detach().double() * n, res["ce"].double() * n, res["kd"].double() * n,
                                 res["hidden"].double() * n, n, n.new_tensor(batch["input_ids"].numel())])
            if cfg.record_windows:
                windows += batch["window_index"].tolist()
        clip = clip_grad_norm if cfg.fsdp else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(params, cfg.max_grad_norm or float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if note:
            print(note, file=sys.stderr, flush=True)
            note = None

        logged = {}
        if step % cfg.log_every == 0 or step == total_steps:
            last = step_metrics(step, all_reduce_sum(sums), reader, lr, grad_norm, time.perf_counter() - t_log)
            if cfg.record_windows:
                last["windows"] = all_gather_objects(windows)  # per rank
            logged = last
            if rank == 0:
                append_jsonl(out / METRICS, last)
                if report:
                    report(last, step)
            sums.zero_()
            windows, t_log = [], time.perf_counter()
        progress.update(step, logged)
        if step % cfg.save_every == 0 or step == total_steps or step == keep_at:
            rngs = all_gather_objects(rng_state())  # every rank's generators, so each resumes its own dropout stream
            if cfg.fsdp:  # every rank writes its shards
                save_sharded_checkpoint(out, step, model, {
                    "step": step, "scheduler": scheduler.state_dict(), "reader": reader.state_dict(), "rng": rngs,
                }, cfg.keep_last, lambda folder: write_rank_shards(folder, step_fn, optimizer, rank, world), rank, world,
                    tokenizer=dataset_tokenizer(ds) if rank == 0 else None)
                if rank == 0 and step == keep_at:
                    keep_stable_copy(out, step)
            elif rank == 0:
                save_checkpoint(out, step, model, {
                    "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "reader": reader.state_dict(), "projections": projections.state_dict(), "rng": rngs,
                }, cfg.keep_last, tokenizer=dataset_tokenizer(ds))
                if step == keep_at:
                    keep_stable_copy(out, step)
            barrier()
        if eval_reader is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            with gathered(step_fn) if cfg.fsdp else nullcontext():
                metrics = run_eval(model, eval_reader, device, amp_dtype, fused, cfg)
            if rank == 0:
                append_jsonl(out / METRICS, {"step": step, "eval": metrics})
                if report:
                    report({"eval": metrics}, step)
        if cfg.step_sleep:
            time.sleep(cfg.step_sleep)
    progress.close()
    del loader  # stops its worker processes

    # --- finish: final evaluation, OUT/model/ (student, tokenizer, model card), run.json -----------------------------
    final = dict(last or last_train_metrics(out / METRICS))
    if eval_reader is not None:
        with gathered(step_fn) if cfg.fsdp else nullcontext():
            final["eval"] = run_eval(model, eval_reader, device, amp_dtype, fused, cfg)
        if rank == 0:  # once: a resumed finished run (or one killed after this line) does not log it again
            drop_jsonl_lines(out / METRICS, lambda x: x.get("step") == step and "eval" in x)
            append_jsonl(out / METRICS, {"step": step, "eval": final["eval"]})
            if report:
                report({"eval": final["eval"]}, step)
    full = full_state_dict(model, rank) if cfg.fsdp else None  # --fsdp: gathered on rank 0 (every rank takes part)
    if rank == 0:  # the student alone in OUT/model/ (what to upload), with a model card; checkpoints stay outside it
        card = model_card(asdict(cfg), dataset_identity(ds), final, total_steps, sum(p.numel() for p in model.parameters()))
        student = plain_student(model, full, cfg.trust_remote_code) if cfg.fsdp else model
        save_final_model(out, student, dataset_tokenizer(ds), card)
        if report:
            report.close()
        write_json_atomic(out / RUN, {
            "dataset": dataset_identity(ds), "eval_dataset": dataset_identity(eval_ds) if eval_ds else None,
            "config": asdict(cfg), "world_size": world, "steps": total_steps, "batches_per_epoch": reader.batches_per_epoch,
            "loss_impl": "fused" if fused else "plain", "hidden_layer_map": {str(k): v for k, v in layer_map.items()},
            "final_metrics": final,
        })
    barrier()
    close_distributed()
    if lock is not None:
        unlock_folder(lock)
    return final


def target_kind(cfg: TrainConfig, ds) -> tuple[str, list[str]]:
    """Which stored targets the loss reads ('topk', 'sampled' or 'none'), and why the dataset cannot serve the run."""
    if cfg.online_teacher or cfg.alpha == 1.0:
        return "none", []
    if stored_target_kind(ds) == "none":
        return "none", [f"dataset {ds.url} stores no teacher distribution (top_k=0); pass --ce-only, --online-teacher, "
                        "or rerun precompute with --top-k"]
    if cfg.targets == "auto":
        return stored_target_kind(ds), []
    if cfg.targets not in ds.target_kinds:
        return "none", [f"--targets {cfg.targets}: the dataset stores {' and '.join(ds.target_kinds)} targets; pass "
                        f"--targets {ds.target_kinds[0]} or rerun precompute with --targets {cfg.targets}"]
    return cfg.targets, []


def stored_temperature(cfg: TrainConfig, ds, targets: str, rank: int = 0) -> tuple[float | None, list[str]]:
    """The temperature whose stored log-normalizer the reader attaches to top-k batches (None: none needed or used), and
    why the run cannot go on. Stored top-k log-probs are normalized at T = 1: tempering them exactly needs the teacher's
    log sum_v p_v^(1/T), captured with `precompute --temperatures`; --approximate-temperature falls back to the --tail
    approximation (printed warning). Sampled targets never use it: they are tempered as a plug-in estimate."""
    if targets != "topk" or cfg.temperature == 1.0:
        return None, []
    stored = ds.capture.log_norm_temperatures
    if float(cfg.temperature) in stored:
        return float(cfg.temperature), []
    listed = ", ".join(f"{t:g}" for t in stored) or "none"
    if not cfg.approximate_temperature:
        return None, [f"--temperature {cfg.temperature:g}: dataset {ds.url} stores the teacher's log-normalizer at "
                      f"temperatures {listed} (besides 1), so its top-k cannot be tempered exactly at {cfg.temperature:g}; "
                      f"rerun precompute with --temperatures 1,{cfg.temperature:g}, or pass --approximate-temperature"]
    if rank == 0:
        print(f"warning: --approximate-temperature: the dataset has no log-normalizer at T = {cfg.temperature:g} (stored: "
              f"{listed}); the top-k is tempered with the --tail {cfg.tail} approximation, which can be far from "
              "tempered KD (rerun precompute with --temperatures to make it exact)", file=sys.stderr)
    return None, []


def resume_point(out: Path, cfg: TrainConfig, ds) -> Path | None:
    """The checkpoint to continue from (None: start fresh); refuses a folder holding another run or one it cannot continue."""
    markers = [out / TRAIN_CONFIG, out / METRICS, out / RUN, out / CHECKPOINTS]
    if not any(p.exists() for p in markers):
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no distill run; choose an empty or new folder")
        return None
    if not cfg.resume:
        raise UserError(f"--out {out} holds another run; pass --resume to continue it, or choose a new --out")
    try:
        saved = json.loads((out / TRAIN_CONFIG).read_text()) if (out / TRAIN_CONFIG).exists() else {}
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"--out {out}: its {TRAIN_CONFIG} is not a JSON object (damaged); restore it or choose a new --out")
    if saved.get("dataset", {}).get("manifest_sha256", ds.manifest_sha256) != ds.manifest_sha256:
        raise UserError(f"--out {out} holds a run on another dataset ({saved['dataset'].get('url')}); pass that --data, "
                        "or choose a new --out")
    diff = trajectory_diff(saved_with_same_paths(saved, cfg), cfg)  # paths compared by what they name
    if diff:
        raise UserError(f"--resume with changed settings ({', '.join(diff)}); pass the settings recorded in "
                        f"{out / TRAIN_CONFIG}, or choose a new --out")
    found = resumable_checkpoints(out)
    old = saved.get("config", {})
    if not found or not steps_extensible(old, cfg) or old["steps"] == cfg.steps:
        return found[-1][1] if found else None
    # An extension (or a shortening): the newest checkpoint taken before the two totals' schedules part. With constant
    # that is the newest one; with wsd a finished run has decayed, so it is the copy kept at the end of its stable phase.
    before = lr_schedule(old["schedule"], old.get("warmup", cfg.warmup), old["steps"], old.get("decay_steps"))
    after = lr_schedule(cfg.schedule, cfg.warmup, cfg.steps, cfg.decay_steps)
    part = next((i for i in range(max(old["steps"], cfg.steps)) if before(i) != after(i)), max(old["steps"], cfg.steps))
    usable = [(s, p) for s, p in found if s <= min(part, cfg.steps)]
    if not usable:
        raise UserError(f"--steps {cfg.steps}: no checkpoint in {out / CHECKPOINTS} was taken before step {part}, where "
                        f"the {cfg.schedule} schedules of {old['steps']} and {cfg.steps} steps part; choose a new --out")
    return usable[-1][1]


STABLE = "stable-"  # wsd: OUT/checkpoints/stable-NNNNNN, a copy of the checkpoint at the end of the stable phase


def resumable_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints and kept wsd stable-phase copies as (step, folder), oldest first (a step-* before a copy)."""
    root = out / CHECKPOINTS
    kept = [(int(p.name[len(STABLE):]), p) for p in root.glob(STABLE + "[0-9]*")
            if p.name[len(STABLE):].isdigit() and (p / "state.pt").is_file()] if root.is_dir() else []
    return sorted(list_checkpoints(out) + kept, key=lambda x: (x[0], x[1].name.startswith(STABLE)))


def keep_stable_copy(out: Path, step: int) -> None:
    """Copy the checkpoint of `step` (the last before wsd's decay) where the keep-last rotation never deletes it."""
    final = out / CHECKPOINTS / f"{STABLE}{step:06d}"
    tmp = final.with_name(f"{final.name}.tmp-copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir(out, step), tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for s, path in resumable_checkpoints(out):  # an older copy is on the same trajectory but no longer needed
        if path.name.startswith(STABLE) and s < step:
            shutil.rmtree(path)


def forget_abandoned(out: Path, cfg: TrainConfig, step: int) -> None:
    """After choosing where to continue: delete checkpoints past `step` (they belong to the trajectory of the old total,
    e.g. a decayed wsd ending), then record the new total. In this order, so a kill in between leaves a folder whose
    recorded total and checkpoints still agree."""
    for s, path in resumable_checkpoints(out):
        if s > step:
            shutil.rmtree(path)
    path = out / TRAIN_CONFIG
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config", {}).get("steps") != cfg.steps and steps_extensible(saved.get("config", {}), cfg):
            saved["config"]["steps"] = cfg.steps
            write_json_atomic(path, saved)


def start_run_folder(out: Path, cfg: TrainConfig, ds, step: int) -> None:
    """Record the config, dataset and what its paths name (first start), drop metrics lines past the step being resumed
    from, and delete checkpoints beyond --keep-last that a killed run left."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / TRAIN_CONFIG).exists():
        write_json_atomic(out / TRAIN_CONFIG, {"config": asdict(cfg), "dataset": dataset_identity(ds),
                                               "identities": run_identities(cfg)})
    path = out / METRICS
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= step]
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    prune_checkpoints(out, cfg.keep_last, step)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank line or one cut short by a kill mid-append."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def dataset_identity(ds) -> dict:
    return {"url": ds.url, "manifest_sha256": ds.manifest_sha256, "teacher": ds.manifest.teacher.name_or_path,
            "windows": ds.windows, "seq_len": ds.seq_len, "top_k": ds.top_k}


def step_metrics(step: int, sums: torch.Tensor, reader: WindowReader, lr: float, grad_norm, seconds: float) -> dict:
    """One metrics.jsonl line from the token-weighted sums since the last line (summed over ranks)."""
    tokens = max(float(sums[4]), 1.0)
    return {"step": step, "epoch": round(reader.epoch + reader.batch_in_epoch / reader.batches_per_epoch, 4),
            "loss": float(sums[0]) / tokens, "ce": float(sums[1]) / tokens, "kd": float(sums[2]) / tokens,
            "hidden": float(sums[3]) / tokens, "lr": lr, "grad_norm": float(grad_norm), "tokens": int(sums[4]),
            "tokens_per_s": float(sums[5]) / max(seconds, 1e-9)}


def make_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (nanoGPT): norms and biases are not pulled toward zero."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def lr_schedule(schedule: str, warmup: int, total: int, decay_steps: int | None = None):
    """LR multiplier after `step` optimizer steps, for --schedule cosine, constant or wsd (linear warmup first).

    constant and wsd give every step before the decay the same value whatever the total, which is what lets a run be
    extended; wsd then decays linearly over the last `decay_steps` d (default 20% of the total), d/(d+1) down to
    1/(d+1), reaching 0 one step past the end. A warmup longer than the run is scaled to 10% of it (`effective_warmup`).
    """
    warmup = effective_warmup(warmup, total)
    if schedule == "cosine":
        return warmup_cosine(warmup, total)
    start = stable_end(schedule, warmup, total, decay_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if start is None or step < start:
            return 1.0
        return max(0.0, (total - step) / (total - start + 1))  # d/(d+1) ... 1/(d+1): each decay step lower

    return factor


def stable_end(schedule: str, warmup: int, total: int, decay_steps: int | None) -> int | None:
    """wsd: the step where the decay starts (its checkpoint is kept for extensions); None for other schedules."""
    if schedule != "wsd":
        return None
    decay = decay_steps if decay_steps is not None else max(1, round(0.2 * total))
    return max(1, total - decay)


def warmup_cosine(warmup: int, total: int):
    """LR multiplier after `step` optimizer steps: linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The reader's batch as DistillStep's arguments, on the device."""
    inputs = {key: batch[key].to(device, non_blocking=True)
              for key in ("input_ids", "labels", "teacher_ids", "teacher_logprobs", "position_ids", "teacher_log_norm")
              if key in batch}
    if "hidden" in batch:
        inputs["hidden"] = {layer: h.to(device, non_blocking=True) for layer, h in batch["hidden"].items()}
    return inputs


def run_eval(model, reader: WindowReader, device, amp_dtype, fused: bool, cfg: TrainConfig) -> dict:
    """Metrics on --eval-data: each rank evaluates its part, the sums are added over ranks."""
    sums = evaluate_batches(model, make_loader(reader, 0), device, amp_dtype, fused, cfg.chunk_size, cfg.eval_batches)
    if sums is None:  # this rank had no windows; it still takes part in the reduction
        sums = metric_sums(torch.zeros(0, 1, device=device), torch.zeros(0, dtype=torch.long, device=device))
    return finish_metrics({k: all_reduce_sum(v.double()) for k, v in sums.items()})


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def drop_jsonl_lines(path: Path, drop) -> None:
    """Rewrite a JSON-lines file without the lines for which `drop(obj)` is true (atomically; no-op when none)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not (line.strip() and _json_or_none(line) is not None and drop(_json_or_none(line)))]
    if len(kept) != len(lines):
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def _json_or_none(line: str):
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def last_train_metrics(path: Path) -> dict:
    """The last training line of metrics.jsonl (for a resumed run that had nothing left to do)."""
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((x for x in reversed(lines) if "loss" in x), {})


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # per-load/save bars would drown the training bar
