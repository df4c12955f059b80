"""The run state on disk (harmodt_fast/checkpoint.py): every field survives a save and a load, a file that would
run code is refused, the resume compatibility rule and its messages, and older formats are migrated (format 1:
the untrained state and return heads, one sampler state per rank; export format 1 likewise)."""
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
    with pytest.raises(CheckpointError, match="mask_update_memory_mb: 256.0 there vs 1.0 now"):
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
