"""What a training run prints while it runs, and where else its metrics go: called by `trainer.train` (rank 0).

On a terminal: a tqdm bar. Elsewhere (batch jobs, `> log` files) carriage-return bars are noise, so plain lines, one at
the first and last logged step and at most every `log_seconds` in between, with step, loss, tokens/s and ETA. `quiet`
prints nothing. `--report-to` also hands every metrics line to tensorboard, mlflow or wandb (the package is checked at
config time; see `TrainConfig.report_to`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


class Progress:
    """Progress output for steps `initial+1 .. total`; `update(step, metrics)` after each step (metrics may be {})."""

    def __init__(self, total: int, initial: int, *, enabled: bool, bar: bool | None, log_seconds: float, stream=None):
        self.total, self.initial, self.enabled, self.log_seconds = total, initial, enabled, log_seconds
        self.stream = stream or sys.stderr
        use_bar = enabled and (bar if bar is not None else self.stream.isatty())
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=self.stream)
        self.t0 = time.perf_counter()
        self.last_line = None  # time of the last plain line

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            return
        if not metrics:
            return
        now = time.perf_counter()
        due = self.last_line is None or step == self.total or now - self.last_line >= self.log_seconds
        if due:
            self.last_line = now
            print(progress_line(step, self.total, metrics, now - self.t0, step - self.initial), file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_line(step: int, total: int, metrics: dict, elapsed: float, done: int) -> str:
    """`step 10/50 (20%)  loss 5.1234  lr 3.00e-04  tokens/s 5870  elapsed 0:00:12  eta 0:00:48`."""
    eta = elapsed / done * (total - step) if done else 0.0
    return (f"step {step}/{total} ({100 * step / total:.0f}%)  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
            f"tokens/s {metrics['tokens_per_s']:.0f}  elapsed {_hms(elapsed)}  eta {_hms(eta)}")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def make_reporter(kind: str, out: Path, config: dict):
    """A callable `report(metrics, step)` plus `close()` for --report-to, or None for 'none'."""
    if kind == "none":
        return None
    numeric = lambda m: {k: v for k, v in _flat(m) if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        return Reporter(lambda m, s: [writer.add_scalar(k, v, s) for k, v in numeric(m).items()], writer.close)
    if kind == "mlflow":
        import mlflow

        mlflow.start_run()
        mlflow.log_params({k: str(v) for k, v in config.items()})
        return Reporter(lambda m, s: mlflow.log_metrics(numeric(m), step=s), mlflow.end_run)
    if kind == "wandb":
        import wandb

        wandb_run = wandb.init(config=config, dir=str(out))
        return Reporter(lambda m, s: wandb_run.log(numeric(m), step=s), wandb_run.finish)
    raise ValueError(kind)


class Reporter:
    def __init__(self, report, close):
        self.report, self.close = report, close

    def __call__(self, metrics: dict, step: int) -> None:
        self.report(metrics, step)


def _flat(metrics: dict, prefix: str = ""):
    """('eval/ce', 4.2)-style pairs: nested dicts (the eval metrics) become prefixed names."""
    for k, v in metrics.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v
