"""TrainConfig and EvalConfig: every setting of `distill train` / `distill eval`, shared by the CLI and the Python API.

Imports no torch, so `distill --help` stays light. The CLI help text is the docstring under each field (`field_help`).
"""

from __future__ import annotations

import importlib.util
import os
import typing
from dataclasses import dataclass, fields
from functools import lru_cache

from pipeline.common.errors import UserError

from .losses.config import HIDDEN_LOSS_KINDS, LOSS_KINDS, TAIL_MODES, LossConfig

DTYPES = ("auto", "bfloat16", "float32")
LOSS_IMPLS = ("fused", "plain")
TARGETS = ("auto", "topk", "sampled")
SCHEDULES = ("cosine", "constant", "wsd")
REPORT_TO = {"none": None, "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # choice -> package
EXTENSIBLE_SCHEDULES = ("constant", "wsd")  # their values before a step do not depend on the total: --steps can change


@dataclass
class TrainConfig:
    data: str
    """Dataset folder or fsspec URL (file://, s3://, ...) written by `distill precompute`."""
    out: str
    """Run folder: checkpoints/, metrics.jsonl, run.json and, at the end, model/: the student with its tokenizer and a
    model card (loadable with from_pretrained; upload that sub-folder, not the run)."""
    student: str | None = None
    """Student to start from: a local folder or a Hugging Face hub id of a causal LM."""
    student_config: str | None = None
    """Start from random weights built from this config.json instead (uses the dataset's tokenizer)."""
    online_teacher: str | None = None
    """Baseline: run this teacher at every step and distill from its full-vocabulary logits instead of the stored ones."""
    targets: str = "auto"
    """Stored teacher targets to distill from: topk, sampled, or auto (the dataset's first stored kind)."""
    # The loss settings (loss, tail, alpha, temperature, beta, chunk_size) are LossConfig's: same names and defaults,
    # and their help text is the docstring under each field of trainer/losses/config.py (one definition).
    loss: str = LossConfig.loss
    tail: str = LossConfig.tail
    alpha: float = LossConfig.alpha
    ce_only: bool = False
    """CE-only baseline on the same data order: same as --alpha 1."""
    temperature: float = LossConfig.temperature
    approximate_temperature: bool = False
    """With stored top-k and a --temperature the dataset has no log-normalizer for (precompute --temperatures): temper
    with the --tail approximation instead of refusing, with a printed warning (it can be far from tempered KD: the mass
    outside the stored ids is not known at T other than 1). Sampled targets need no flag: at T other than 1 their
    estimates are raised to 1/T and renormalized over the drawn ids, a consistent but biased (O(1/N)) plug-in estimate
    of the tempered teacher."""
    beta: float = LossConfig.beta
    hidden_weight: float = 0.0
    """Weight of the hidden-state loss (0 = off). Needs a dataset captured with --hidden-layers."""
    hidden_map: str | None = None
    """Student:teacher hidden_states indices, e.g. '1:2,2:4' (default: evenly spaced over the layers)."""
    hidden_loss: str = "mse"
    """Hidden-state loss: mse or cosine, after a learned linear projection of the student's states."""
    steps: int | None = None
    """Optimizer steps to run (default: --epochs 1)."""
    epochs: int | None = None
    """Passes over the dataset, when --steps is not given."""
    batch_size: int = 8
    """Windows per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    warmup: int = 100
    """Steps of linear warmup; then the --schedule."""
    schedule: str = "cosine"
    """Learning rate after the warmup: cosine (decays to 0 at the last step), constant, or wsd (warmup-stable-decay:
    constant, then a linear decay to 0 over the last --decay-steps). A constant or wsd run can be extended: resume it
    with a larger --steps and it continues exactly as if it had been started with that total."""
    decay_steps: int | None = None
    """wsd only: steps of the final linear decay (default: 20% of --steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms and biases)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 autocast on CUDA with bf16 support, else float32), bfloat16 or float32. Weights stay float32."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N. Under torchrun each rank takes cuda:LOCAL_RANK."""
    seed: int = 0
    """Seed of the student init, the data order and every random number generator."""
    shuffle_shards: int = 16
    """Shards whose windows are shuffled together: each epoch takes the shards in a seeded order in blocks of this many
    and shuffles the windows across each block (1 = within one shard only). A shard holds a few consecutive documents of
    the corpus, so larger blocks give more varied batches; each block's shards are open (memory-mapped, or in the cache
    of a remote dataset) while it is read."""
    save_every: int = 1000
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 3
    """Checkpoints to keep; older ones are deleted."""
    resume: bool = False
    """Continue from the newest complete checkpoint in --out (needed to reuse a folder that holds a run)."""
    eval_data: str | None = None
    """Held-out dataset to evaluate on during training and at the end."""
    eval_every: int | None = None
    """Evaluate on --eval-data every this many steps (default: only at the end)."""
    eval_batches: int | None = None
    """Evaluate on at most this many batches per process (default: the whole --eval-data)."""
    storage_options: str | None = None
    """JSON object of extra fsspec filesystem arguments for URL datasets (e.g. '{"profile": "team"}'); credentials
    otherwise come from the standard places (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL). Never recorded."""
    cache_dir: str | None = None
    """Local folder for the shards of a URL dataset, fetched ahead of use and checked against their checksums on
    arrival (default $XDG_CACHE_HOME/distill/shards)."""
    cache_gb: float = 20.0
    """Size limit of --cache-dir in GB; least recently used shards not in use are deleted to stay under it."""
    workers: int = 0
    """DataLoader worker processes per rank (0 = read in the training process)."""
    log_every: int = 1
    """Write a metrics.jsonl line (and refresh the progress bar) every this many steps."""
    loss_impl: str = "fused"
    """fused: chunked loss from the last hidden state, never building full logits; plain: full logits (for checking)."""
    chunk_size: int = LossConfig.chunk_size
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    fsdp: bool = False
    """Shard the student, its optimizer state and the hidden-state projections across the torchrun processes (PyTorch
    FSDP2: each transformer block gathered only while it runs), for students too large for one device. --dtype
    bfloat16 computes in bfloat16 with float32 master weights and gradient reduction; checkpoints are sharded (one
    file per process; resume with the same number of processes); OUT/model/ is still one ordinary model folder.
    Without torchrun it runs 1-way (nothing split)."""
    trust_remote_code: bool = False
    """Allow model code from the student's or teacher's repository to run. Only for models you trust."""
    progress: bool = True
    """Show a progress bar on a terminal. Outside a terminal (batch jobs, log files), and with --no-progress, print plain
    lines instead (step, loss, tokens/s, ETA): at the first and last step and at most every --log-seconds."""
    quiet: bool = False
    """Print no progress bar and no progress lines (metrics.jsonl is still written)."""
    log_seconds: float = 30.0
    """Seconds between plain progress lines (0 = one at every --log-every step)."""
    report_to: str = "none"
    """Also send the metrics to tensorboard (OUT/tensorboard), mlflow or wandb, when that package is installed; none = only
    metrics.jsonl."""
    threads: int = 1
    """CPU threads for the student's math when training on the CPU (default 1: on a busy shared 2-core machine a tiny
    student trained 10x or more faster with 1 thread than with 2; on a machine of your own, try the free cores)."""
    record_windows: bool = False
    """Debug: record the window_index of every sample each step in metrics.jsonl (all ranks gathered)."""
    step_sleep: float = 0.0
    """Debug: sleep this many seconds after each step (lets crash tests kill a run mid-way)."""
    command: list[str] | None = None
    """Command line recorded in run.json (set by the CLI)."""

    def resolve(self) -> "TrainConfig":
        """Apply conveniences (--ce-only, default --epochs 1) and check every value; raise one UserError listing all problems."""
        if self.ce_only:
            self.alpha = 1.0
        if self.steps is None and self.epochs is None:
            self.epochs = 1
        problems = []
        if (self.student is None) == (self.student_config is None):
            problems.append("give exactly one of --student PATH_OR_HUB_ID and --student-config CONFIG.json")
        if self.steps is not None and self.epochs is not None:
            problems.append("give --steps or --epochs, not both")
        for name, choices in (("loss", LOSS_KINDS), ("tail", TAIL_MODES), ("hidden_loss", HIDDEN_LOSS_KINDS), ("dtype", DTYPES),
                              ("loss_impl", LOSS_IMPLS), ("targets", TARGETS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                problems.append(f"--{_flag(name)} is {getattr(self, name)!r}; expected one of {', '.join(choices)}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"--alpha is {self.alpha}; expected a value in [0, 1]")
        if self.temperature <= 0:
            problems.append(f"--temperature is {self.temperature}; expected a positive value")
        if not 0.0 < self.beta < 1.0:
            problems.append(f"--beta is {self.beta}; expected a value strictly between 0 and 1 (the JSD mixture weight)")
        for name in ("hidden_weight", "weight_decay", "max_grad_norm", "step_sleep"):
            if getattr(self, name) < 0:
                problems.append(f"--{_flag(name)} is {getattr(self, name)}; expected 0 or more")
        if self.decay_steps is not None and self.schedule != "wsd":
            problems.append(f"--decay-steps is for --schedule wsd (got --schedule {self.schedule}); drop it or pass "
                            "--schedule wsd")
        for name in ("steps", "epochs", "batch_size", "grad_accum", "save_every", "keep_last", "eval_every",
                     "eval_batches", "log_every", "chunk_size", "decay_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{_flag(name)} is {value}; expected a positive integer")
        if self.warmup < 0 or self.workers < 0:
            problems.append("--warmup and --workers must be 0 or more")
        if self.lr <= 0:
            problems.append(f"--lr is {self.lr}; expected a positive value")
        if self.online_teacher and self.hidden_weight > 0:
            problems.append("--hidden-weight is not supported with --online-teacher; drop one of them")
        if (self.eval_every or self.eval_batches) and not self.eval_data:
            problems.append("--eval-every/--eval-batches need --eval-data; pass a held-out dataset")
        if self.report_to not in REPORT_TO:
            problems.append(f"--report-to is {self.report_to!r}; expected one of {', '.join(REPORT_TO)}")
        elif REPORT_TO[self.report_to] and importlib.util.find_spec(REPORT_TO[self.report_to]) is None:
            problems.append(f"--report-to {self.report_to} needs the {REPORT_TO[self.report_to]} package, which is not "
                            f"installed; pip install {REPORT_TO[self.report_to]}, or drop --report-to")
        if self.shuffle_shards < 1:
            problems.append(f"--shuffle-shards is {self.shuffle_shards}; expected 1 or more (1 = shuffle within each shard only)")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads is {self.threads}; expected a positive integer")
        if self.log_seconds < 0:
            problems.append(f"--log-seconds is {self.log_seconds}; expected 0 or more")
        if self.hidden_map and self.hidden_weight == 0:
            problems.append("--hidden-map given but --hidden-weight is 0; pass --hidden-weight > 0 to use it")
        from pipeline.format.remote import parse_storage_options, refuse_url

        for flag, path in (("--out", self.out), ("--cache-dir", self.cache_dir)):
            try:
                refuse_url(path, flag, "train")  # a URL would become a local folder named `s3:`
            except UserError as e:
                problems.append(str(e))
        if self.cache_gb <= 0:
            problems.append(f"--cache-gb is {self.cache_gb}; expected a positive size in GB")
        if self.storage_options and getattr(self, "_storage", None) is None:
            try:
                self._storage = parse_storage_options(self.storage_options)
                # the config is recorded (train_config.json, run.json, --report-to): the options may hold credentials
                self.storage_options = "(given; not recorded)"
            except UserError as e:
                problems.append(str(e))
        if problems:
            raise UserError("; ".join(problems))
        return self

    def data_options(self) -> dict:
        """open_dataset's arguments for --data and --eval-data: storage options and the local cache of a URL dataset."""
        return data_options(self)


@dataclass
class EvalConfig:
    student: str
    """Student to evaluate: a run folder written by `distill train` (its model/), a checkpoint, or any causal LM folder
    or hub id."""
    data: str
    """Held-out dataset folder or fsspec URL written by `distill precompute`."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_batches: int | None = None
    """Stop after this many batches (default: the whole dataset)."""
    dtype: str = "float32"
    """Compute dtype: auto, bfloat16 or float32."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    chunk_size: int = 1024
    """Positions per chunk when computing logits (bounds memory)."""
    trust_remote_code: bool = False
    """Allow model code from the student's repository to run. Only for models you trust."""
    storage_options: str | None = None
    """JSON object of extra fsspec filesystem arguments for URL datasets (e.g. '{"profile": "team"}'); credentials
    otherwise come from the standard places (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL). Never recorded."""
    cache_dir: str | None = None
    """Local folder for the shards of a URL dataset, fetched ahead of use and checked against their checksums on
    arrival (default $XDG_CACHE_HOME/distill/shards)."""
    cache_gb: float = 20.0
    """Size limit of --cache-dir in GB; least recently used shards not in use are deleted to stay under it."""

    def data_options(self) -> dict:
        """open_dataset's arguments for --data: storage options and the local cache of a URL dataset."""
        return data_options(self)


def data_options(cfg) -> dict:
    """open_dataset's arguments for a URL dataset (format/remote.py, format/cache.py); --storage-options parsed."""
    from pipeline.format.remote import parse_storage_options

    options = getattr(cfg, "_storage", None)
    return {"storage_options": options if options is not None else parse_storage_options(cfg.storage_options),
            "cache_dir": cfg.cache_dir, "cache_gb": cfg.cache_gb}


def _flag(name: str) -> str:
    return name.replace("_", "-")


@lru_cache(maxsize=None)
def load_config_file(path: str) -> dict:
    """Read a YAML or JSON config whose keys are TrainConfig fields (dashes or underscores); refuse unknown keys."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    with open(path) as f:
        text = f.read()
    import yaml  # YAML is a superset of JSON, so one parser reads both

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"--config {path} is not valid YAML or JSON: {' '.join(str(e).split())}")
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must hold a mapping of option names to values")
    known = {f.name for f in fields(TrainConfig)} - {"command"}
    out = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(out) - known)
    if unknown:
        raise UserError(f"--config {path} has unknown keys {unknown}; valid keys are the `distill train` flags")
    problems = []
    for name, value in out.items():
        try:
            out[name] = _coerce(TrainConfig, name, value)
        except (TypeError, ValueError):
            problems.append(f"{name}: {value!r}")
    if problems:
        raise UserError(f"--config {path} has values of the wrong type ({', '.join(problems)}); use the flags' types")
    return out


def _coerce(cls, name: str, value):
    """A config-file value as the field's type: YAML reads `lr: 3e-4` as a string, for one."""
    hint = typing.get_type_hints(cls)[name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None or kinds[0] not in (int, float, bool):
        return value
    if kinds[0] is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(name)
    if isinstance(value, bool):
        raise TypeError(name)
    if kinds[0] is int and float(value) != int(float(value)):
        raise ValueError(name)
    return int(float(value)) if kinds[0] is int else float(value)


# Fields whose change alters the training trajectory: a resumed run must use the same values as the checkpoint.
TRAJECTORY_FIELDS = (
    "student", "student_config", "online_teacher", "targets", "loss", "tail", "alpha", "temperature", "hidden_weight", "hidden_map",
    "hidden_loss", "steps", "epochs", "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "max_grad_norm", "dtype",
    "seed", "loss_impl", "schedule", "decay_steps", "fsdp",
)


def effective_warmup(warmup: int, total: int) -> int:
    """The warmup a run of `total` steps uses: --warmup, or 10% of the run when --warmup is longer than the run (it would
    never reach the peak learning rate). `warmup_note` says so in one line."""
    return warmup if warmup <= total else total // 10


def warmup_note(warmup: int, total: int) -> str | None:
    if warmup <= total:
        return None
    return (f"note: --warmup {warmup} is longer than the run ({total} steps) and would never reach the peak --lr; warming "
            f"up over {total // 10} steps (10% of the run) instead; pass --warmup {total} or less to choose")


def steps_extensible(saved: dict, cfg: TrainConfig) -> bool:
    """May a resumed run change --steps? Only with a schedule whose values before a step do not depend on the total
    (constant, wsd), the same one as recorded, and a step count given on both sides (not --epochs)."""
    return (cfg.schedule in EXTENSIBLE_SCHEDULES and saved.get("schedule", "cosine") == cfg.schedule
            and saved.get("steps") is not None and cfg.steps is not None)


def trajectory_diff(saved: dict, cfg: TrainConfig) -> list[str]:
    """Flags whose value differs from the run being resumed, as 'name: saved -> now' (plus the fix, for --steps)."""
    diff = []
    for k in TRAJECTORY_FIELDS:
        if k not in saved or saved[k] == getattr(cfg, k):
            continue
        if k == "steps" and steps_extensible(saved, cfg):
            continue  # an extension: trainer.train.resume_point picks a checkpoint both totals agree on
        item = f"--{_flag(k)}: {saved.get(k)!r} -> {getattr(cfg, k)!r}"
        if k == "steps" and saved.get("schedule", "cosine") == "cosine":
            item += (" (the cosine schedule depends on the total, so this run cannot be extended; to extend runs, start "
                     "them with --schedule constant or --schedule wsd)")
        diff.append(item)
    return diff

