"""The run state on disk (harmodt_fast/checkpoint.py): every field survives a save and a load, a file that would
run code is refused, the resume compatibility rule and its messages, and older formats are migrated (format 1:
the untrained state and return heads, one sampler state per rank; export format 1 likewise). Broken checkpoints
and exports (issue 21's probe cases) are refused with a CheckpointError naming the file and what is wrong, before
any model is built; an export's files are checked together."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.checkpoint import (CHECKPOINT_FORMAT, EXPORT_FORMAT, NON_TRAJECTORY_FIELDS, CheckpointError,
                                     RunState, load_checkpoint, read_export, read_run, save_atomic)
from harmodt_fast.trainer import Trainer

TASKS = ("reach-v3", "button-press-v3")  # Meta-World names: hf.evaluate can roll the runs out


def config(**kw):
    base = dict(tasks=TASKS, steps=4, mask_interval=2, log_every=2, precision="fp32")
    return hf.HarmoDTConfig.from_preset("tiny", **{**base, **kw})


def trainer(out, cfg=None, fingerprint="synthetic"):
    cfg = cfg or config()
    return Trainer(cfg, SyntheticSampler(cfg, seed=0), str(out), torch.device("cpu"), fingerprint)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run stopped at step 2 (its checkpoint) and the same run done straight to step 4 (the reference)."""
    root = tmp_path_factory.mktemp("runs")
    trainer(root / "half").run(stop_at=2, progress=False)
    straight = trainer(root / "straight")
    straight.run(progress=False)
    return root, straight.model.state_dict()


def format_1(ckpt: dict, samplers: int = 1) -> dict:
    """`ckpt` (current format) in the shape format 1 wrote: the state and return heads' weights in the model,
    and with samplers > 0 (early format-1 files) a list of that many sampler states and RNG states, one per rank."""
    cfg = ckpt["config"]
    g = torch.Generator().manual_seed(5)
    heads = {"predict_state.weight": torch.randn(cfg["state_dim"], cfg["hidden"], generator=g),
             "predict_state.bias": torch.randn(cfg["state_dim"], generator=g),
             "predict_return.weight": torch.randn(1, cfg["hidden"], generator=g),
             "predict_return.bias": torch.randn(1, generator=g)}
    old = {**ckpt, "format": "harmodt_fast/1", "model": {**ckpt["model"], **heads}}
    if samplers:
        old.update(sampler=[ckpt["sampler"]] * samplers, rng=ckpt["rng"] * samplers)
    return old


# ---- the round trip -------------------------------------------------------------------------------------------------
def test_every_field_survives_save_and_load(runs, tmp_path):
    root, _ = runs
    state = RunState.load(str(root / "half"))
    assert state.step == 2 and state.tasks == list(TASKS) and state.world_size == 1
    assert None not in (state.optimizer, state.sampler, state.rng, state.task_agreement, state.eval_prompts)
    state.task_envs = {"reach-v3": '{"id": "x"}'}  # a field the synthetic run leaves empty
    path = state.save(str(tmp_path / "again.pt"))
    assert torch.load(path, weights_only=True)["format"] == CHECKPOINT_FORMAT
    again = RunState.load(path)
    for f in dataclasses.fields(RunState):
        a, b = getattr(state, f.name), getattr(again, f.name)
        assert type(a) is type(b), f.name
        if f.name in ("model", "eval_prompts"):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        elif f.name in ("optimizer", "sampler", "rng"):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f.name)
        else:
            assert a == b, f.name
    assert set(load_checkpoint(path)) == {"format"} | {f.name for f in dataclasses.fields(RunState)}


def test_read_run_takes_every_form(runs, tmp_path):
    root, _ = runs
    state = RunState.load(str(root / "half"))
    result = hf.trainer.TrainResult(str(root / "half" / "checkpoint.pt"), [], None, config(), str(root / "half"), 2)
    folder = hf.export(state, tmp_path / "export")
    for source in (str(root / "half"), result, state, state.to_dict(), folder):
        got, name = read_run(source)
        assert isinstance(got, RunState) and got.tasks == list(TASKS) and got.step == 2, name
        assert all(torch.equal(got.model[k], state.model[k]) for k in state.model), name
    assert read_run(state) == (state, "run state") and read_run(state.to_dict())[1] == "checkpoint dict"
    assert read_export(folder).optimizer is None  # an export has no resume part
    with pytest.raises(ValueError, match="expected a checkpoint path.*got int"):
        read_run(3)
    with pytest.raises(CheckpointError, match="lacks \\['state_std'\\]"):
        read_run({k: v for k, v in state.to_dict().items() if k != "state_std"})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(runs, tmp_path):
    root, _ = runs
    marker = tmp_path / "pwned"
    ckpt = load_checkpoint(str(root / "half"))
    ckpt["extra_object"] = _Payload(str(marker))
    bad = tmp_path / "run" / "checkpoint.pt"
    bad.parent.mkdir()
    torch.save(ckpt, bad)
    assert not marker.exists()
    for reader in (load_checkpoint, RunState.load, hf.load_policy, lambda p: hf.evaluate(p, episodes=1, workers=0)):
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt: refused: .*would run code"):
            reader(str(bad))
        assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        hf.export(str(bad.parent), tmp_path / "export")
    assert not marker.exists() and not (tmp_path / "export").exists()
    # the same file through plain pickle would have run it: the test's payload is real
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_files_that_are_not_checkpoints_are_refused(runs, tmp_path):
    root, _ = runs
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        RunState.load(str(tmp_path / "none.pt"))
    save_atomic({**load_checkpoint(str(root / "half")), "format": "harmodt_fast/9"}, str(tmp_path / "future.pt"))
    save_atomic([1, 2], str(tmp_path / "list.pt"))
    with pytest.raises(CheckpointError, match=r"future\.pt: not a harmodt_fast checkpoint \(format 'harmodt_fast/9'\)"):
        RunState.load(str(tmp_path / "future.pt"))
    with pytest.raises(CheckpointError, match=r"list\.pt: not a harmodt_fast checkpoint \(format 'list'\)"):
        RunState.load(str(tmp_path / "list.pt"))
    whole = (root / "half" / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # a file cut short (not by our atomic writes)
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot be read as a checkpoint"):
        RunState.load(str(tmp_path / "cut.pt"))


# ---- the resume rule ------------------------------------------------------------------------------------------------
def test_resume_rule_allows_only_fields_that_leave_the_trajectory(runs):
    root, _ = runs
    state = RunState.load(str(root / "half"))
    cfg = config()
    state.check_resumable(cfg, "synthetic", "ck")
    for name, value in (("log_every", 7), ("eval_every", 3), ("backend", "torch"), ("compile", True),
                        ("extra", {"note": 1}), ("checkpoint_every", 9)):
        assert name in NON_TRAJECTORY_FIELDS
        state.check_resumable(dataclasses.replace(cfg, **{name: value}), "synthetic", "ck")
    with pytest.raises(CheckpointError, match=r"^ck belongs to a run with another config \(lr: 0\.001 there vs 0\.5 "
                                              r"now, seed: 0 there vs 3 now\); use another output folder"):
        state.check_resumable(dataclasses.replace(cfg, lr=0.5, seed=3), "synthetic", "ck")
    with pytest.raises(CheckpointError, match=r"^ck was trained on other data \(fingerprint synthetic vs other\)"):
        state.check_resumable(cfg, "other", "ck")
    # a field the checkpoint lacks (added since it was written) counts as its default
    del state.config["mask_update_memory_mb"]
    state.check_resumable(cfg, "synthetic", "ck")
    with pytest.raises(CheckpointError, match="mask_update_memory_mb: None there vs 1.0 now"):
        state.check_resumable(dataclasses.replace(cfg, mask_update_memory_mb=1.0), "synthetic", "ck")
    with pytest.raises(CheckpointError, match=r"ck holds no resume state \(optimizer, sampler, rng missing"):
        dataclasses.replace(state, optimizer=None, sampler=None, rng=None).check_resumable(cfg, "synthetic", "ck")


# ---- migrations -----------------------------------------------------------------------------------------------------
def test_a_format_1_checkpoint_with_the_heads_loads_resumes_and_evaluates(runs, tmp_path):
    root, straight = runs
    new = load_checkpoint(str(root / "half"))
    os.makedirs(tmp_path / "old")
    save_atomic(format_1(new, samplers=0), str(tmp_path / "old" / "checkpoint.pt"))
    state = RunState.load(str(tmp_path / "old"))
    assert state.model.keys() == new["model"].keys()  # the heads' weights are dropped
    assert not any(k.startswith(("predict_state", "predict_return")) for k in hf.HarmoDT(config()).state_dict())
    # a policy and a Meta-World evaluation from it: the same as from the current-format file (or its RunState)
    obs = np.random.default_rng(0).normal(size=(2, 39))
    acts = []
    for source in (str(tmp_path / "old"), str(root / "half"), RunState.load(str(root / "half"))):
        policy = hf.load_policy(source, device="cpu", precision="fp32")
        policy.reset(list(TASKS))
        acts.append(policy.act(obs))
    np.testing.assert_array_equal(acts[0], acts[1])
    np.testing.assert_array_equal(acts[0], acts[2])
    kw = dict(episodes=1, max_episode_steps=3, workers=0, precision="fp32", device="cpu")
    assert hf.evaluate(str(tmp_path / "old"), **kw)["per_task"] == hf.evaluate(str(root / "half"), **kw)["per_task"]
    # resuming it reproduces the uninterrupted run exactly
    resumed = trainer(tmp_path / "old")
    assert resumed.step == 2 and resumed.run(progress=False).step == 4
    final = resumed.model.state_dict()
    assert final.keys() == straight.keys() and all(torch.equal(final[k], straight[k]) for k in final)
    assert torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)["format"] == CHECKPOINT_FORMAT


def test_format_1_checkpoints_with_one_sampler_state_per_rank_still_load(runs, tmp_path):
    """Early format-1 checkpoints held a list of sampler states (one per rank): one of one loads as before; several
    load rank 0's with a warning (their ranks drew their own batches, batch_per_task now means the global batch)."""
    root, _ = runs
    new = load_checkpoint(str(root / "half"))
    assert isinstance(new["sampler"], dict)
    for name, count in (("one", 1), ("two", 2)):
        os.makedirs(tmp_path / name)
        save_atomic(format_1(new, samplers=count), str(tmp_path / name / "checkpoint.pt"))
        if count == 1:
            resumed = trainer(tmp_path / name)
        else:
            with pytest.warns(UserWarning, match="written by 2 processes.*rank 0's sampler"):
                resumed = trainer(tmp_path / name)
        assert resumed.step == 2 and resumed.run(progress=False).step == 4
        assert isinstance(RunState.load(str(tmp_path / name)).sampler, dict)


def test_a_format_1_export_with_the_heads_loads(runs, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _ = runs
    folder = hf.export(str(root / "half"), tmp_path / "export")
    meta = json.loads(open(os.path.join(folder, "config.json")).read())
    assert meta["format"] == EXPORT_FORMAT
    weights = load_file(os.path.join(folder, "model.safetensors"))
    old = format_1({**load_checkpoint(str(root / "half")), "model": weights}, samplers=0)["model"]
    save_file({k: v.contiguous() for k, v in old.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**meta, "format": "harmodt_fast-export/1"}, f)
    state = read_export(folder)
    assert state.model.keys() == weights.keys() and all(torch.equal(state.model[k], weights[k]) for k in weights)
    hf.load_policy(folder, device="cpu")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**meta, "format": "harmodt_fast-export/9"}, f)
    with pytest.raises(CheckpointError, match=r"not a harmodt_fast export \(format 'harmodt_fast-export/9', "
                                              r"expected 'harmodt_fast-export/2'\)"):
        read_export(folder)


# ---- validation before any work (issue 21: findings 3 and 6) -------------------------------------------------------
def broken(state: RunState, **changes) -> RunState:
    """A copy of `state` with `changes`: "config.<field>" and "model.<key>" (None drops the key) edit inside."""
    d = {**state.to_dict(), "config": dict(state.config), "model": dict(state.model)}
    for key, value in changes.items():
        part, _, inner = key.partition(".")
        target = d[part] if inner else d
        inner = inner or key
        if value is None:
            target.pop(inner)
        else:
            target[inner] = value
    return d


MASK = "blocks.0.attn.c_attn.masks_packed"
WEIGHT = "blocks.0.attn.c_attn.weight"


@pytest.mark.parametrize("changes,message", [
    ({"config.hidden": "64"}, r"config: HarmoDTConfig: hidden must be an integer, got '64'"),
    ({"config.layers": 2.5}, r"config: HarmoDTConfig: layers must be an integer, got 2\.5"),
    ({"config.layers": 1_000_000}, r"config: HarmoDTConfig: the model would take .* GiB \(hidden=64, layers=1000000"),
    ({"config.layers": 3}, r"config\.layers is 3 but the model holds 2 blocks"),
    ({"config.hidden": 128}, r"model\['embed\.timestep\.weight'\] has shape \(500, 64\), expected \(500, 128\)"),
    ({"config": None}, r"checkpoint lacks \['config'\]"),
    ({"tasks": None}, r"checkpoint lacks \['tasks'\]"),
    ({"tasks": ["reach-v3", "reach-v3"]}, r"tasks must be distinct non-empty names"),
    ({"config.num_tasks": 3, "config.tasks": None}, r"config\.num_tasks is 3 but the task list has 2 names"),
    ({"model." + WEIGHT: None, "model.renamed.weight": torch.zeros(192, 64)},
     r"model tensors differ .*1 missing \['blocks\.0\.attn\.c_attn\.weight'\], 1 unexpected \['renamed\.weight'\]"),
    ({"model." + WEIGHT: torch.zeros(64, 64)}, r"model\['blocks\.0\.attn\.c_attn\.weight'\] has shape \(64, 64\), "
                                               r"expected \(192, 64\)"),
    ({"model." + WEIGHT: torch.zeros(192, 64, dtype=torch.int64)}, r"c_attn\.weight'\] has dtype torch\.int64"),
    ({"model." + MASK: torch.zeros(2, 384)},
     r"c_attn\.masks_packed'\] has dtype torch\.float32, expected torch\.int32"),
    ({"model." + WEIGHT: torch.full((192, 64), float("nan"))}, r"c_attn\.weight'\] holds non-finite values"),
    ({"state_std": torch.zeros(2, 39)}, r"state_std has entries <= 0 for task\(s\) \['reach-v3', 'button-press-v3'\]"),
    ({"state_mean": torch.zeros(2, 38)}, r"state_mean has shape \(2, 38\) \(torch.float32\), expected \(2, 39\)"),
    ({"step": "2"}, r"step is a str, expected int"),
    ({"model": [1, 2]}, r"model is a list, expected dict"),
])
def test_broken_run_states_are_refused_naming_what(runs, tmp_path, changes, message):
    root, _ = runs
    bad = broken(RunState.load(str(root / "half")), **changes)
    path = save_atomic(bad, str(tmp_path / "run" / "checkpoint.pt"))
    for reader in (read_run, hf.load_policy, lambda p: hf.export(p, tmp_path / "export")):
        with pytest.raises(CheckpointError, match=rf"checkpoint\.pt: .*{message}"):
            reader(path)
    assert not (tmp_path / "export").exists()  # export refuses a broken source before writing anything
    with pytest.raises(CheckpointError, match=message):
        read_run(bad)


def test_all_zero_masks_are_refused(runs):
    root, _ = runs
    state = RunState.load(str(root / "half"))
    model = {k: (torch.cat([v[:1], torch.zeros_like(v[1:])]) if k.endswith("masks_packed") else v)
             for k, v in state.model.items()}
    with pytest.raises(CheckpointError, match=r"masks of task\(s\) \['button-press-v3'\] keep no weight"):
        read_run(dataclasses.replace(state, model=model))


def test_a_stride_0_tensor_is_refused_before_anything_allocates_it(runs, tmp_path):
    """A 2 MB file can hold a view of shape (3e9,) over one element: reading it must not materialise 12 GB."""
    root, _ = runs
    huge = torch.zeros(1).expand(3_000_000_000)
    for key in ("model." + WEIGHT, "state_mean"):
        path = save_atomic(broken(RunState.load(str(root / "half")), **{key: huge}), str(tmp_path / "c.pt"))
        assert os.path.getsize(path) < 4_000_000
        what = r"model\['blocks\.0\.attn\.c_attn\.weight'\]" if key.startswith("model") else "state_mean"
        for reader in (read_run, lambda p: hf.export(p, tmp_path / "export")):
            with pytest.raises(CheckpointError, match=rf"c\.pt: {what}: shape \(3000000000,\) needs 12000000000 "
                                                      r"bytes but its storage holds 4"):
                reader(path)


def test_export_configs_that_do_not_fit_their_tensors_are_refused(runs, tmp_path):
    """config.json beside a small model.safetensors claiming a huge model: refused before any model is built."""
    root, _ = runs
    folder = hf.export(str(root / "half"), tmp_path / "export")
    meta = json.loads(open(os.path.join(folder, "config.json")).read())
    for changes, message in (({"layers": 1_000_000}, r"the model would take .* GiB"),
                             ({"hidden": 60000}, r"the model would take .* GiB"),
                             ({"layers": 40}, r"config\.layers is 40 but the model holds 2 blocks"),
                             ({"hidden": "64"}, r"hidden must be an integer")):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**meta, "config": {**meta["config"], **changes}}, f)
        for reader in (read_run, hf.load_policy):
            with pytest.raises(CheckpointError, match=rf"export: config: .*{message}|export: {message}"):
                reader(folder)
    for key, value, message in (("tasks", None, r"lacks \['tasks'\]"), ("config", None, r"lacks \['config'\]"),
                                ("step", "6", r"'step' is a str, expected int"),
                                ("config", [1], r"'config' is a list, expected dict")):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({k: v for k, v in {**meta, key: value}.items() if v is not None}, f)
        with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
            read_run(folder)


def test_an_interrupted_or_mixed_export_never_loads(runs, tmp_path, monkeypatch):
    import harmodt_fast.checkpoint as ckpt

    root, _ = runs
    state = RunState.load(str(root / "half"))
    other = dataclasses.replace(state, model={k: (v + 1 if v.is_floating_point() else v) for k, v in
                                              state.model.items()})
    hf.export(state, tmp_path / "a")
    hf.export(other, tmp_path / "b")
    # new weights beside the old config: named, not loaded
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"a/model\.safetensors: not the file .*config\.json was written with"):
        hf.load_policy(str(tmp_path / "a"))
    # a re-export killed after its first file: the folder holds no config.json, so nothing loads
    hf.export(state, tmp_path / "a")
    writes = []

    def dies_after_one_file(path, write, binary=True):
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        return ckpt.atomic_write.__wrapped__(path, write, binary)

    dies_after_one_file.__wrapped__ = ckpt.atomic_write
    monkeypatch.setattr(ckpt, "atomic_write", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        hf.export(other, tmp_path / "a")
    monkeypatch.undo()
    assert writes == [str(tmp_path / "a" / "model.safetensors")]
    with pytest.raises(CheckpointError, match=r"a/config\.json: missing"):
        hf.load_policy(str(tmp_path / "a"))
    hf.export(other, tmp_path / "a")  # exported again, it loads
    assert torch.equal(read_run(str(tmp_path / "a"))[0].model[WEIGHT], other.model[WEIGHT])


def test_resume_parts_that_do_not_fit_are_refused(runs, tmp_path):
    """A resume whose optimizer, rng or sampler state is missing or does not fit the model: CheckpointError naming
    the part, before the trainer loads any of it (not a KeyError, or a RuntimeError inside Adam)."""
    root, _ = runs
    state = RunState.load(str(root / "half"))
    opt = state.optimizer
    wrong_moment = {**opt, "state": {**opt["state"], 3: {**opt["state"][3], "exp_avg": torch.zeros(7)}}}
    nan_moment = {**opt, "state": {**opt["state"], 0: {**opt["state"][0],
                                                       "exp_avg_sq": opt["state"][0]["exp_avg_sq"] * float("nan")}}}
    no_step = {**opt, "state": {**opt["state"], 0: {k: v for k, v in opt["state"][0].items() if k != "step"}}}
    for changes, message in (
            ({"optimizer": {"param_groups": opt["param_groups"]}}, r"optimizer is not an optimizer state"),
            ({"optimizer": wrong_moment}, r"optimizer state\[3\]\['exp_avg'\] has shape \(7,\), the parameter has"),
            ({"optimizer": nan_moment}, r"optimizer state\[0\]\['exp_avg_sq'\] is not finite"),
            ({"optimizer": no_step}, r"optimizer state\[0\] lacks the tensor 'step'"),
            ({"optimizer": {**opt, "param_groups": [{**opt["param_groups"][0], "params": [0, 1]}]}},
             r"optimizer covers 2 parameters, the model has"),
            ({"rng": [{"cuda": None}]}, r"rng\[0\] holds no torch generator state"),
            ({"rng": []}, r"rng\[0\] holds no torch generator state"),
            ({"sampler": {"tasks": list(TASKS)}}, r"sampler state has no 'generator'"),
            ({"model." + WEIGHT: state.model[WEIGHT] * float("nan")}, r"c_attn\.weight'\] holds non-finite"),
            ({"optimizer": None}, r"holds no resume state \(optimizer missing")):
        folder = tmp_path / f"r{len(os.listdir(tmp_path))}"
        save_atomic(broken(state, **changes), str(folder / "checkpoint.pt"))
        with pytest.raises(CheckpointError, match=rf"checkpoint\.pt.*{message}"):
            trainer(folder)


def test_the_cli_prints_one_line_for_a_broken_checkpoint(runs, tmp_path, capsys):
    from harmodt_fast.cli import main

    root, _ = runs
    path = save_atomic(broken(RunState.load(str(root / "half")), **{"model." + WEIGHT: torch.zeros(64, 64)}),
                       str(tmp_path / "bad.pt"))
    for argv in (["export", path, str(tmp_path / "export")], ["evaluate", path, "--no-plots"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "bad.pt: model['blocks.0.attn.c_attn.weight'] has shape" in err, err
