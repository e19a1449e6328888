"""Stage two's commands, `distill train` and `distill eval`: click commands that parse flags into TrainConfig /
EvalConfig and call the stage.

`pipeline.common.cli` lists this module's `commands` group in `distill`; `python -m trainer.cli` runs it alone.
Flags and their help come from the config fields (pipeline.common.cli.config_options: one source for both). torch is imported inside the
commands, so `distill --help` stays light. A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import click

from pipeline.common.cli import config_options, given
from pipeline.common.errors import UserError, run_or_exit

from .config import DTYPES, LOSS_IMPLS, TARGETS, EvalConfig, TrainConfig, load_config_file
from .losses.config import HIDDEN_LOSS_KINDS, LOSS_KINDS, TAIL_MODES, LossConfig

options = partial(config_options, skip=("command",), on_off=("progress",), help_from=(LossConfig,),
                  hidden=("record_windows", "step_sleep"),  # debugging aids, not shown in --help
                  choices={"loss": LOSS_KINDS, "tail": TAIL_MODES, "hidden_loss": HIDDEN_LOSS_KINDS, "dtype": DTYPES,
                           "loss_impl": LOSS_IMPLS, "targets": TARGETS})


def build_train_config(config_file: str | None, typed: dict) -> TrainConfig:
    """Values from --config, overridden by typed flags; --data and --out must come from one of them."""
    values = (load_config_file(config_file) if config_file else {}) | typed
    missing = [f"--{k}" for k in ("data", "out") if not values.get(k)]
    if missing:
        raise UserError(f"missing {' and '.join(missing)}; pass {'them' if len(missing) > 1 else 'it'} as flags or in --config")
    from pipeline.format.remote import redact_command

    return TrainConfig(**values, command=redact_command(sys.argv[:]))  # never a --storage-options secret in run.json


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML or JSON file with the same keys as the flags (e.g. batch_size: 16); flags override it.")
@options(TrainConfig)
@click.pass_context
def train_command(ctx, config_file, **values):
    """Train a student from a dataset written by `distill precompute` (no teacher needed).

    \b
    distill train --data DIR_OR_URL --out DIR --student PATH_OR_HUB_ID
    distill train --data DIR --out DIR --student-config config.json --steps 1000
    torchrun --nproc-per-node 8 -m trainer.cli train --data s3://bucket/ds --out runs/s1 --student ...
    """

    def run():
        cfg = build_train_config(config_file, given(ctx, values))
        from .train import train

        final = train(cfg)
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "ce", "kd") if isinstance(final.get(k), float))
        if final.get("eval"):
            summary += f"; eval ce {final['eval']['ce']:.4f}, kl {final['eval']['kl']}"
        click.echo(f"saved student to {cfg.out} ({summary})", err=True)

    run_or_exit(run)


@click.command("eval")
@options(EvalConfig, required=("student", "data"))
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
def eval_command(as_json, **values):
    """Evaluate a student on a held-out dataset: CE and perplexity, KL(teacher || student) over the stored buckets,
    top-1 agreement with the teacher, expected calibration error."""

    def run():
        from .evaluate import evaluate

        cfg = EvalConfig(**values)
        bad = [f"--{k.replace('_', '-')} is {getattr(cfg, k)}; expected a positive integer"
               for k in ("batch_size", "max_batches", "chunk_size") if getattr(cfg, k) is not None and getattr(cfg, k) < 1]
        if bad:
            raise UserError("; ".join(bad))
        metrics = evaluate(cfg)
        if as_json:
            click.echo(json.dumps(metrics))
            return
        for key, unit in (("ce", "nats/token"), ("perplexity", ""), ("kl", "nats/token"), ("top1_agreement", ""),
                          ("ece", ""), ("accuracy", ""), ("tokens", "")):
            value = metrics[key]
            if value is None:
                value, unit = "n/a", "(the dataset stores no top-k)"
            elif isinstance(value, float):
                value = f"{value:.4f}"
            click.echo(f"{key:15s} {value} {unit}".rstrip())

    run_or_exit(run)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def commands():
    """distill stage two: train, eval (`python -m trainer.cli` runs them without stage one)."""


commands.add_command(train_command)
commands.add_command(eval_command)

if __name__ == "__main__":
    commands()
