"""HarmoDTConfig.parse_value: a --set value is parsed by the field's declared type (one owner of the types), and
a bad value is refused naming the field, not silently turned into something else."""
import re

import pytest

from harmodt_fast.cli import _parse_overrides
from harmodt_fast.config import HarmoDTConfig


@pytest.mark.parametrize("name,text,want", [
    ("lr", "3e-4", 3e-4), ("layers", "4", 4), ("compile", "true", True), ("compile", "Off", False),
    ("compile", "1", True), ("merge_threshold", "none", None), ("merge_threshold", "7", 7),
    ("eval_workers", "None", None), ("backend", "triton", "triton"), ("logger", "tensorboard,wandb",
                                                                     "tensorboard,wandb"),
    ("logger", "none", None), ("tasks", "MT10", "MT10"), ("extra", '{"note": "x"}', {"note": "x"}),
])
def test_values_parse_by_the_declared_type(name, text, want):
    got = HarmoDTConfig.parse_value(name, text)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("name,text", [("compile", "ture"), ("density", "abc"), ("steps", "2.7"), ("seed", "1.5"),
                                       ("layers", "none"), ("extra", "[1, 2]")])
def test_bad_values_name_the_field(name, text):
    with pytest.raises(ValueError, match=rf"config field '{name}' .*cannot parse '{re.escape(text)}'"):
        HarmoDTConfig.parse_value(name, text)


def test_cli_overrides_build_a_config():
    overrides = _parse_overrides(["lr=1e-3", "compile=false", "merge_threshold=none", "logger=tensorboard"])
    cfg = HarmoDTConfig.from_preset("tiny", **overrides)
    assert cfg.lr == 1e-3 and cfg.compile is False and cfg.merge_threshold is None and cfg.logger == ("tensorboard",)
    with pytest.raises(ValueError, match="unknown config field 'learning_rate'"):
        _parse_overrides(["learning_rate=1"])
    with pytest.raises(ValueError, match="--set expects name=value"):
        _parse_overrides(["lr"])
