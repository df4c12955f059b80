"""HarmoDTConfig.parse_value: a --set value is parsed by the field's declared type (one owner of the types), and
a bad value is refused naming the field, not silently turned into something else. Every construction checks every
field's type, range and the model's size (issue 21's probe cases)."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

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


# ---- every construction checks types, ranges and size (issue 21: finding 7) ----------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("steps", 2.7, "steps must be an integer, got 2.7"), ("seed", 1.5, "seed must be an integer, got 1.5"),
    ("layers", 2.5, "layers must be an integer, got 2.5"), ("hidden", "64", "hidden must be an integer, got '64'"),
    ("compile", "ture", "compile must be true or false, got 'ture'"), ("layers", True, "layers must be an integer"),
    ("grad_clip", -1, r"grad_clip must be > 0 .*got -1"), ("task_grad_clip", 0, "task_grad_clip must be > 0"),
    ("lr", float("inf"), "lr must be a finite number, got inf"), ("lr", 0, "lr must be > 0"),
    ("grad_clip", float("nan"), "grad_clip must be a finite number, got nan"),
    ("rtg_scale", 0, "rtg_scale must be > 0"), ("rtg_scale", float("nan"), "rtg_scale must be a finite number"),
    ("max_ep_len", 0, "max_ep_len must be >= 1, got 0"), ("gamma", float("nan"), "gamma must be a finite number"),
    ("eta_max", -50, r"eta_min and eta_max .* 0 <= eta_min <= eta_max, got eta_min=0, eta_max=-50"),
    ("eta_min", 10**9, r"eta_min and eta_max .* 0 <= eta_min <= eta_max, got eta_min=1000000000"),
    ("eta_min", 1e9, "eta_min must be an integer, got 1000000000.0"),
    ("weight_decay", -1e-4, "weight_decay must be >= 0"), ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("seed", -1, r"seed must be in 0\.\.2\*\*63-1, got -1"), ("eval_episodes", 0, "eval_episodes .* must be >= 1"),
    ("eval_workers", -1, "eval_workers must be None or >= 0"), ("state_dim", 0, "state_dim and act_dim must be >= 1"),
    ("target_return", float("inf"), "target_return must be a finite number"),
    ("tasks", "MT10", "tasks must be a list of strings or None, got 'MT10'"),
    ("tasks", ["reach-v3", "reach-v3"], "tasks must be distinct non-empty names"),
    ("extra", [1], "extra must be a dict"), ("merge_threshold", 1.0, "merge_threshold must be an integer or None"),
    ("layers", 1_000_000, r"the model would take 214\.8 GiB \(hidden=64, layers=1000000"),
    ("hidden", 60000, r"the model would take .* GiB \(hidden=60000"),
])
def test_bad_config_values_are_refused_naming_the_field(field, value, message):
    for build in (lambda: HarmoDTConfig.from_preset("tiny", **{field: value}),
                  lambda: HarmoDTConfig.from_dict({**HarmoDTConfig.from_preset("tiny").to_dict(), field: value}),
                  lambda: dataclasses.replace(HarmoDTConfig.from_preset("tiny"), **{field: value})):
        with pytest.raises(ValueError, match=rf"^HarmoDTConfig: {message}"):
            build()


def test_eta_beyond_the_masked_weights_names_eta_not_memory():
    with pytest.raises(ValueError, match=r"eta_max \(1000000000 flips per mask update\) exceeds the 98304 masked"):
        HarmoDTConfig.from_preset("tiny", eta_min=10**9, eta_max=10**9)


def test_numbers_of_other_types_are_converted():
    cfg = HarmoDTConfig.from_preset("tiny", steps=np.int64(7), lr=1, density=np.float32(0.5))
    assert (type(cfg.steps), type(cfg.lr), type(cfg.density)) == (int, float, float) and cfg.steps == 7
    assert HarmoDTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="a config must be a dict of fields, got list"):
        HarmoDTConfig.from_dict([1])


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("paper", {}), ("large", {"num_tasks": 50}),
                                              ("tiny", {"method": "mtdt"}), ("tiny", {"prompt_len": 0}),
                                              ("demo", {"activation": "gelu", "max_ep_len": 7})])
def test_the_size_from_the_fields_is_the_model_s(preset, overrides):
    """num_parameters (the size bound, and the check of a checkpoint's config) is the built model's count."""
    from harmodt_fast.masks import masked_weight_shapes
    from harmodt_fast.model import HarmoDT

    cfg = HarmoDTConfig.from_preset(preset, **overrides)
    with torch.device("meta"):
        model = HarmoDT(dataclasses.replace(cfg, method="prompt-dt") if cfg.use_masks else cfg)
    assert cfg.num_parameters() == model.num_parameters()
    assert cfg.masked_weights() == sum(a * b for a, b in masked_weight_shapes(model).values())


def test_cli_setup_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """An unknown device or a backend this machine cannot run: one line and exit 2, before any data is read."""
    from harmodt_fast import ops
    from harmodt_fast.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU machine without the interpreter
    monkeypatch.setattr(ops._dispatch, "_decisions", {})
    missing = str(tmp_path / "no-data")
    # the backend check's error is a ValueError as well as a RuntimeError: wherever it comes from (a checkpoint's
    # backend read by evaluate too), the CLI prints it as bad input
    with pytest.raises(ValueError, match="triton backend cannot run here"):
        ops.check_backend("triton", torch.device("cpu"))
    for argv, message in ((["train", missing, "--out", str(tmp_path / "r"), "--device", "tpu"], "device 'tpu': "),
                          (["evaluate", missing, "--device", "tpu"], "device 'tpu': "),
                          (["train", missing, "--out", str(tmp_path / "r"), "--device", "cpu", "--set",
                            "backend=triton"], "triton backend cannot run here: .*triton backend needs CUDA"),
                          (["train", missing, "--out", str(tmp_path / "r"), "--set", "grad_clip=-1"],
                           "grad_clip must be > 0")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_fractional_counts_are_refused_not_truncated(tmp_path):
    """steps=2.7 once ran 2 steps; a fractional episode count once collected int() of it."""
    import harmodt_fast as hf

    with pytest.raises(ValueError, match="steps"):
        hf.train(str(tmp_path / "no-data"), str(tmp_path / "run"), preset="tiny", steps=2.7)
    with pytest.raises(ValueError, match="episodes_per_task must be an integer"):
        hf.reproduce("MT5", str(tmp_path / "suite"), steps=10, episodes_per_task=4.5)
    with pytest.raises(ValueError, match=r"seeds\[1\] must be an integer"):
        hf.reproduce("MT5", str(tmp_path / "suite"), steps=10, seeds=(0, 1.5))
    assert not (tmp_path / "run").exists() and not (tmp_path / "suite").exists()
