"""The `distill` command group and the one way a command's options are made: from its config dataclass.

Each stage owns a click group of its commands (`pipeline.cli:commands`, `trainer.cli:commands`); `distill` lists them
by import string and imports a stage only when its commands are listed or run, so neither stage imports the other.
`config_options` turns a config dataclass into click options: one per field, help = the docstring under the field,
default = the field's default. Imports no torch (`distill --help` stays light).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import typing
from dataclasses import MISSING, fields

import click
from click.core import ParameterSource

VERSION = "0.1.0"
# Each stage's click group, as "module:attribute"; imported on first use.
STAGES = ("pipeline.cli:commands", "trainer.cli:commands")


def field_help(cls) -> dict[str, str]:
    """Field name -> the docstring written under it in a dataclass (the CLI's help text comes from the same words)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            out[node.target.id] = " ".join(str(nxt.value.value).split())
    return out


class CommaList(click.ParamType):
    """A comma-separated list of numbers ("2,-1", "1,2,4") as a list of `item`."""

    def __init__(self, item: type):
        self.item, self.name = item, f"{item.__name__.upper()}S"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [self.item(x) for x in value]
        try:
            return [self.item(x) for x in str(value).replace(" ", "").split(",") if x]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__} values (e.g. 2,-1)", param, ctx)


def _click_type(cls, f, choices: dict) -> tuple[object, bool]:
    """The click type of a field and whether the flag repeats: list[str] fields repeat (--data a --data b), lists of
    numbers are one comma-separated value (--hidden-layers 2,-1)."""
    if f.name in choices:
        return click.Choice(choices[f.name]), False
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = {int: int, float: float, bool: bool, str: str}.get(args[0], str)
    if typing.get_origin(hint) is list:
        return (str, True) if base is str else (CommaList(base), False)
    return base, False


def config_options(cls, *, required: tuple[str, ...] = (), choices: dict | None = None, hidden: tuple[str, ...] = (),
                   on_off: tuple[str, ...] = (), skip: tuple[str, ...] = (), types: dict | None = None,
                   extra_help: dict | None = None, help_from: tuple = ()):
    """Decorator adding one click option per field of the config dataclass `cls` (in field order).

    help: the field's docstring, or that of the same field in one of the `help_from` dataclasses (+ `extra_help[name]`);
    default: the field's default (shown unless None/False/empty).
    choices: field -> allowed values; hidden: fields left out of --help; on_off: booleans that default to on and get
    --x/--no-x; skip: fields that are not flags; types: field -> click type overriding the annotation's.
    list[str] fields become repeatable flags, lists of numbers one comma-separated value.
    """
    helps = {k: v for other in help_from for k, v in field_help(other).items()} | field_help(cls)
    choices, types, extra_help = choices or {}, types or {}, extra_help or {}

    def decorate(fn):
        for f in reversed([f for f in fields(cls) if f.name not in skip]):
            flag = "--" + f.name.replace("_", "-")
            default = f.default_factory() if f.default_factory is not MISSING else None if f.default is MISSING else f.default
            kind, repeat = (types[f.name], False) if f.name in types else _click_type(cls, f, choices)
            text = " ".join(x for x in (helps.get(f.name, ""), extra_help.get(f.name, "")) if x)
            shown = default is not None and default is not False and default != []
            common = dict(help=text, hidden=f.name in hidden, show_default=shown)
            if kind is bool:
                decls = [f"{flag}/--no-{flag[2:]}"] if f.name in on_off else [flag]
                fn = click.option(*decls, f.name, is_flag=True, default=bool(default), **common)(fn)
            else:
                fn = click.option(flag, f.name, type=kind, default=default or None if repeat else default, multiple=repeat,
                                  required=f.name in required, **common)(fn)
        return fn

    return decorate


def given(ctx: click.Context, values: dict) -> dict:
    """The options the user actually typed (defaults left out, so a --config file can supply them)."""
    return {k: v for k, v in values.items()
            if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)}


def _stage_groups() -> list[click.Group]:
    groups = []
    for spec in STAGES:
        module, name = spec.split(":")
        groups.append(getattr(importlib.import_module(module), name))
    return groups


class _StagesGroup(click.Group):
    """Lists and runs the commands of every stage group (no inheritance beyond click's documented extension point)."""

    def list_commands(self, ctx):
        return sorted({name for g in _stage_groups() for name in g.list_commands(ctx)})

    def get_command(self, ctx, name):
        for g in _stage_groups():
            cmd = g.get_command(ctx, name)
            if cmd is not None:
                return cmd
        return None


@click.group(cls=_StagesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="distill")
def main():
    """distill: run a teacher once, store its logits, train many students from them."""


if __name__ == "__main__":
    main()
