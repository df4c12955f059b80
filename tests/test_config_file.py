"""Config files: `harmodt-fast train --config FILE` and hf.train(config=FILE) with real YAML and JSON files, the
precedence preset < file < overrides, RUN/config.yaml (rerunnable to the same config, rewritten identical on
resume, never by a refused run), one-line errors naming the file and the field, and the generated --help."""
import dataclasses
import json
import os

import pytest
import yaml

import harmodt_fast as hf
from harmodt_fast.checkpoint import CheckpointError, load_checkpoint
from harmodt_fast.cli import main
from harmodt_fast.config import PRESETS, HarmoDTConfig
from harmodt_fast.config_file import field_comments, yaml_value
from harmodt_fast.run_folder import CONFIG_NAME
from test_any_tasks import write_mtdiff

TASKS = ["alpha", "beta"]
QUICK = dict(steps=2, log_every=1, mask_interval=1, checkpoint_every=1000, precision="fp32", eval_every=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mtdiff(tmp_path_factory.mktemp("cfgdata") / "data", TASKS, state_dim=5, act_dim=2)


def write(path, text: str):
    path.write_text(text)
    return str(path)


def printed_config(capsys, argv) -> dict:
    assert main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_yaml_and_json_files_through_the_cli_parser_with_their_precedence(tmp_path, capsys):
    # YAML reads 1e-4 (no dot) as text: parsed as --set parses it
    y = write(tmp_path / "run.yaml", "preset: tiny\nlr: 1e-4\nhidden: 32\nheads: 4\nmethod: prompt-dt\n"
                                     "tasks: reach-v3,push-v3\nlogger: null\neval_workers: none\nextra: {note: x}\n")
    got = printed_config(capsys, ["--config", y])
    tiny = HarmoDTConfig.from_preset("tiny")
    assert (got["lr"], got["hidden"], got["heads"], got["method"]) == (1e-4, 32, 4, "prompt-dt")  # the file's
    assert got["tasks"] == ["reach-v3", "push-v3"] and got["num_tasks"] == 2 and got["extra"] == {"note": "x"}
    assert got["layers"] == tiny.layers == 2 and got["steps"] == tiny.steps  # the file's preset under it
    assert got["eval_workers"] is None and got["logger"] is None
    # the command line over the file: --set, --steps and --preset
    got = printed_config(capsys, ["--config", y, "--set", "hidden=48", "--set", "lr=3e-4", "--steps", "7",
                                  "--preset", "demo"])
    assert (got["hidden"], got["lr"], got["steps"], got["heads"]) == (48, 3e-4, 7, 4)
    assert got["layers"] == PRESETS["demo"]["layers"]  # --preset over the file's preset
    j = write(tmp_path / "run.json", json.dumps({"preset": "tiny", "density": 0.5, "schedule": "round-robin",
                                                 "compile": False, "tasks": ["a", "b", "c"], "eval_workers": 0}))
    got = printed_config(capsys, ["--config", j, "--set", "density=0.7"])
    assert (got["density"], got["schedule"], got["num_tasks"], got["eval_workers"]) == (0.7, "round-robin", 3, 0)
    assert got["hidden"] == tiny.hidden
    # no file: the preset (demo by default) and --set, as before
    got = printed_config(capsys, ["--set", "seed=3"])
    assert got["hidden"] == PRESETS["demo"]["hidden"] and got["seed"] == 3


def test_from_file_precedence_and_an_empty_file(tmp_path):
    path = write(tmp_path / "c.yaml", "preset: tiny\nsteps: 30\nseed: 5\n")
    cfg = HarmoDTConfig.from_file(path, seed=9)
    assert (cfg.steps, cfg.seed, cfg.hidden) == (30, 9, PRESETS["tiny"]["hidden"])  # preset < file < keyword
    assert HarmoDTConfig.from_file(path, preset="paper").hidden == HarmoDTConfig().hidden
    assert HarmoDTConfig.from_file(write(tmp_path / "empty.yaml", "")) == HarmoDTConfig.from_preset("demo")


def test_hf_train_with_yaml_and_json_files_and_run_config_round_trip(data, tmp_path, capsys):
    y = write(tmp_path / "run.yaml", "preset: tiny\nlr: 3e-4\nseed: 4\nbatch_per_task: 2\nlog_every: 7\n")
    run = tmp_path / "run"
    res = hf.train(data, run, config=y, progress=False, lr=1e-3, **QUICK)  # keywords over the file
    cfg = res.config
    assert (cfg.lr, cfg.seed, cfg.batch_per_task, cfg.log_every, cfg.hidden) == (1e-3, 4, 2, 1, 64)
    assert cfg.tasks == tuple(TASKS) and (cfg.state_dim, cfg.act_dim) == (5, 2)  # bound to the data
    written = (run / CONFIG_NAME).read_text()
    assert written.startswith("# ") and yaml.safe_load(written) == cfg.to_dict()  # every field, resolved
    assert HarmoDTConfig.from_file(run / CONFIG_NAME) == cfg
    assert load_checkpoint(res.checkpoint)["config"] == cfg.to_dict()
    # resumed (nothing left to do): config.yaml written again, the same bytes
    os.unlink(run / CONFIG_NAME)
    assert hf.train(data, run, config=y, progress=False, lr=1e-3, **QUICK).step == 2
    assert (run / CONFIG_NAME).read_text() == written
    # the CLI reruns it from RUN/config.yaml alone: the same config, the same config.yaml
    again = tmp_path / "again"
    assert main(["train", str(data), "--out", str(again), "--config", str(run / CONFIG_NAME), "--no-progress"]) == 0
    capsys.readouterr()
    assert load_checkpoint(str(again))["config"] == cfg.to_dict()
    assert (again / CONFIG_NAME).read_text() == written
    # JSON, through hf.train
    j = write(tmp_path / "run.json", json.dumps({"preset": "tiny", "method": "mtdt", "steps": 50}))
    res = hf.train(data, tmp_path / "j", config=j, progress=False, **QUICK)
    assert res.config.method == "mtdt" and res.config.steps == 2 and res.masks is None
    assert yaml.safe_load((tmp_path / "j" / CONFIG_NAME).read_text()) == res.config.to_dict()


def test_a_refused_resume_leaves_the_folders_config_yaml(data, tmp_path):
    run = tmp_path / "run"
    hf.train(data, run, preset="tiny", progress=False, **QUICK)
    before = (run / CONFIG_NAME).read_text()
    with pytest.raises(CheckpointError, match="another config"):
        hf.train(data, run, preset="tiny", progress=False, **{**QUICK, "seed": 1})
    assert (run / CONFIG_NAME).read_text() == before


BAD_FILES = {  # name -> (contents, what the one-line error says besides the file's name)
    "unknown.yaml": ("preset: tiny\nhiden: 32\n", "unknown config field 'hiden' (did you mean 'hidden'?)"),
    "type.yaml": ("hidden: [64]\n", "hidden must be an integer, got [64] (list)"),
    "text.json": ('{"steps": "many"}', "config field 'steps'"),
    "broken.yaml": ("lr: 1e-3\nhidden: [64\n", "not valid YAML: "),
    "broken.json": ('{"lr": 0.1,}', "not valid JSON: "),
    "preset.yaml": ("preset: huge\n", "unknown preset 'huge'"),
    "list.yaml": ("- hidden\n", "expected a mapping of config fields"),
    "range.yaml": ("density: 1.5\n", "density must be in (0, 1], got 1.5"),
    "run.toml": ("hidden = 3\n", "expected a .yaml, .yml or .json file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_are_one_line_errors_naming_file_and_field_before_any_work(name, data, tmp_path, capsys):
    text, says = BAD_FILES[name]
    path = write(tmp_path / name, text)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--config", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err and says in err, err
    with pytest.raises(ValueError) as refused:
        hf.train(data, out, config=path, progress=False)
    assert path in str(refused.value) and says in str(refused.value)
    assert not out.exists()  # refused before the run folder was made


def test_a_malformed_yaml_error_says_where(tmp_path):
    path = write(tmp_path / "c.yaml", "lr: 0.1\nhidden: [64\n")
    with pytest.raises(ValueError, match=r"c\.yaml: not valid YAML: .* \(line 3, column 1\)"):
        HarmoDTConfig.from_file(path)


def test_help_lists_every_field_with_its_type_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    meanings = field_comments(HarmoDTConfig)
    for f in dataclasses.fields(HarmoDTConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert meanings[f.name], f"{f.name} has no comment on its line in config.py"
        entry = f"\n  {f.name}: "
        assert entry in text, f.name
        head, meaning = text.split(entry, 1)[1].split("\n")[:2]
        assert head.endswith(f" = {yaml_value(default)}") and meaning.strip() == meanings[f.name], f.name
    assert "--config FILE" in text and "--print-config" in text
    assert meanings["lr"] == "AdamW learning rate after the warm-up"  # the comment itself, not a section's


def test_train_needs_data_and_out_unless_it_only_prints(capsys):
    assert main(["train", "--out", "x"]) == 2
    assert "required: data, --out" in capsys.readouterr().err
