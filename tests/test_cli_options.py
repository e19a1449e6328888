"""Every command's options come from its config dataclass one way (pipeline.common.cli.config_options): one flag per
field, the field's default, help = the docstring under the field (the loss settings' from LossConfig)."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
from click.testing import CliRunner

from pipeline.cli import precompute
from pipeline.common.cli import field_help, main
from pipeline.config import PrecomputeConfig
from trainer.cli import eval_command, train_command
from trainer.config import EvalConfig, TrainConfig
from trainer.losses.config import LossConfig


def default_of(f):
    return f.default_factory() if f.default_factory is not MISSING else None if f.default is MISSING else f.default


@pytest.mark.parametrize("command, cls, help_from", [(precompute, PrecomputeConfig, ()), (train_command, TrainConfig, (LossConfig,)),
                                                     (eval_command, EvalConfig, ())])
def test_one_flag_per_field_with_its_default_and_docstring(command, cls, help_from):
    params = {p.name: p for p in command.params}
    helps = {k: v for c in help_from for k, v in field_help(c).items()} | field_help(cls)
    for f in fields(cls):
        if f.name == "command":
            assert f.name not in params
            continue
        p = params[f.name]
        assert p.opts[0] == "--" + f.name.replace("_", "-")
        default = default_of(f)
        assert (p.default or None if p.multiple else p.default) == (default or None if p.multiple else default), f.name
        assert helps[f.name] and p.help.startswith(helps[f.name]), f.name


def test_list_flags(tmp_path):
    """--data repeats, --hidden-layers and --temperatures take comma-separated numbers; a bad list is one usage line."""
    params = {p.name: p for p in precompute.params}
    assert params["data"].multiple and params["hidden_layers"].type.convert("2, -1", None, None) == [2, -1]
    assert params["temperatures"].type.convert("1,2,4", None, None) == [1.0, 2.0, 4.0]
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "o"),
                                  "--hidden-layers", "2,x"])
    assert r.exit_code == 2 and "'2,x' is not a comma-separated list of int values" in r.output
