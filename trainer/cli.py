"""`distill train` and `distill eval`: click commands that parse flags into TrainConfig / EvalConfig and call the stage.

`pipeline/cli.py` registers `train_command` and `eval_command` on the `distill` group; `python -m trainer.cli` runs them
without it. Flags and their help come from the config fields (one source for both). torch is imported inside the
commands, so `distill --help` stays light. A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import typing
from dataclasses import MISSING, fields

import click
from click.core import ParameterSource

from pipeline.errors import UserError, run_or_exit

from .config import DTYPES, HIDDEN_LOSSES, LOSS_IMPLS, LOSSES, TAILS, TARGETS, EvalConfig, TrainConfig, field_help, load_config_file

CHOICES = {"loss": LOSSES, "tail": TAILS, "hidden_loss": HIDDEN_LOSSES, "dtype": DTYPES, "loss_impl": LOSS_IMPLS,
           "targets": TARGETS}
HIDDEN = {"record_windows", "step_sleep", "command"}  # debugging aids, not shown in --help
ON_OFF = {"progress"}  # booleans that default to on get --x/--no-x
NOT_FLAGS = {"command"}


def _click_type(cls, f):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if f.name in CHOICES:
        return click.Choice(CHOICES[f.name])
    return {int: int, float: float, bool: bool, str: str}.get(base, str)


def config_options(cls, required: tuple[str, ...] = ()):
    """Decorator adding one click option per config field, with the field's docstring as help."""
    helps = field_help(cls)

    def decorate(fn):
        for f in reversed([f for f in fields(cls) if f.name not in NOT_FLAGS]):
            flag = "--" + f.name.replace("_", "-")
            default = None if f.default is MISSING else f.default
            kind = _click_type(cls, f)
            common = dict(help=helps.get(f.name, ""), hidden=f.name in HIDDEN, show_default=default is not None and default is not False)
            if kind is bool:
                decls = [f"{flag}/--no-{flag[2:]}"] if f.name in ON_OFF else [flag]
                fn = click.option(*decls, f.name, is_flag=True, default=bool(default), **common)(fn)
            else:
                fn = click.option(flag, f.name, type=kind, default=default, required=f.name in required, **common)(fn)
        return fn

    return decorate


def given(ctx: click.Context, values: dict) -> dict:
    """The options the user actually typed (defaults left out, so a --config file can supply them)."""
    return {k: v for k, v in values.items()
            if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)}


def build_train_config(config_file: str | None, typed: dict) -> TrainConfig:
    """Values from --config, overridden by typed flags; --data and --out must come from one of them."""
    values = (load_config_file(config_file) if config_file else {}) | typed
    missing = [f"--{k}" for k in ("data", "out") if not values.get(k)]
    if missing:
        raise UserError(f"missing {' and '.join(missing)}; pass {'them' if len(missing) > 1 else 'it'} as flags or in --config")
    return TrainConfig(**values, command=sys.argv[:])


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML or JSON file with the same keys as the flags (e.g. batch_size: 16); flags override it.")
@config_options(TrainConfig)
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
@config_options(EvalConfig, required=("student", "data"))
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


@click.group()
def _main():
    """distill stage two (standalone entry point: python -m trainer.cli)."""


_main.add_command(train_command)
_main.add_command(eval_command)

if __name__ == "__main__":
    _main()
