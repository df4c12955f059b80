"""hf.load_policy in a plain loop against hf.evaluate's rollout, on a model trained by hf.train on collected data;
pickle-free exports (checkpoints that would run code are refused: test_checkpoint.py)."""
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

import harmodt_fast as hf
from helpers import POLICY_TASKS, train_tiny_policy_run
from harmodt_fast.checkpoint import CheckpointError, load_checkpoint
from harmodt_fast.envs import make_env

TASKS = POLICY_TASKS
STEPS = 12  # tiny context K=5: the policy's 2K window wraps twice


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_policy_run(tmp_path_factory.mktemp("policy"))


def plain_loop(policy, tasks, goals, steps=STEPS, batched=True):
    """Meta-World environments stepped by hand; returns (actions [steps, n, 4], returns [n])."""
    envs = [make_env(t, g) for t, g in zip(tasks, goals)]
    obs = np.stack([env.reset()[0] for env in envs])
    policy.reset(list(tasks) if batched else tasks[0])
    actions, returns = [], np.zeros(len(envs))
    for _ in range(steps):
        a = policy.act(obs) if batched else policy.act(obs[0])[None]
        actions.append(a)
        stepped = [env.step(np.clip(a[i].astype(np.float64), -1, 1)) for i, env in enumerate(envs)]
        obs = np.stack([s[0] for s in stepped])
        rewards = np.array([s[1] for s in stepped])
        returns += rewards
        policy.observe(rewards if batched else rewards[0])
    return np.stack(actions), returns


def test_policy_in_a_plain_loop_matches_evaluate(run):
    report = hf.evaluate(run, episodes=2, max_episode_steps=STEPS, workers=0, precision="fp32", device="cpu")
    policy = hf.load_policy(run, device="cpu", precision="fp32")
    assert policy.tasks == TASKS
    with pytest.raises(RuntimeError, match=r"reset\(tasks\) before act"):
        policy.act(np.zeros((1, 39)))
    # environments in an order that is not the model's task order: the policy regroups its rows inside
    tasks, goals = ["button-press-v3", "reach-v3", "button-press-v3", "reach-v3"], [0, 0, 1, 1]
    actions, returns = plain_loop(policy, tasks, goals)
    for i, (task, goal) in enumerate(zip(tasks, goals)):
        assert returns[i] == pytest.approx(report["per_task"][task]["returns"][goal], rel=1e-5, abs=1e-5), (task, goal)
    # one environment at a time gives the same actions as its row of the batch
    single, single_returns = plain_loop(policy, tasks[1:2], goals[1:2], batched=False)
    np.testing.assert_allclose(single[:, 0], actions[:, 1], rtol=1e-4, atol=1e-5)
    assert single_returns[0] == pytest.approx(returns[1], rel=1e-5)
    with pytest.raises(ValueError, match=r"door-open-v3.*not one this policy acts on"):
        policy.reset(["door-open-v3"])
    policy.reset(TASKS)
    with pytest.raises(ValueError, match=r"observations have shape \(3, 39\), expected \(2, 39\)"):
        policy.act(np.zeros((3, 39)))


def test_export_loads_without_pickle_and_acts_the_same(run, tmp_path, monkeypatch):
    folder = hf.export(run, tmp_path / "export")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "tasks.safetensors"]
    meta = json.loads(open(os.path.join(folder, "config.json")).read())
    assert meta["tasks"] == TASKS and meta["config"]["method"] == "harmodt" and meta["step"] == 6
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "model.safetensors"))
    ckpt = load_checkpoint(run.checkpoint)
    assert weights.keys() == ckpt["model"].keys() and any("masks_packed" in k for k in weights)
    for k, v in ckpt["model"].items():
        assert torch.equal(weights[k], v), k

    # reading the export must not unpickle anything
    def no_pickle(*a, **k):
        raise AssertionError("an export was read through pickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    exported = hf.load_policy(folder, device="cpu", precision="fp32")
    monkeypatch.undo()  # Meta-World itself unpickles its goal variants
    a, ra = plain_loop(exported, TASKS, [0, 1])
    b, rb = plain_loop(hf.load_policy(run, device="cpu", precision="fp32"), TASKS, [0, 1])
    np.testing.assert_array_equal(a, b)
    report = hf.evaluate(folder, episodes=1, max_episode_steps=4, workers=0, precision="fp32")
    assert report["tasks"] == TASKS and report["env_steps"] == 8

    from harmodt_fast.cli import main

    assert main(["export", run.out, str(tmp_path / "cli-export")]) == 0
    out = tmp_path / "report.json"
    assert main(["evaluate", str(tmp_path / "cli-export"), "--episodes", "1", "--max-steps", "4", "--workers", "0",
                 "--no-plots", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["per_task"] == report["per_task"]

    os.unlink(os.path.join(folder, "tasks.safetensors"))
    with pytest.raises(CheckpointError, match=r"tasks\.safetensors: missing"):
        hf.load_policy(folder)


def test_our_checkpoints_load_with_weights_only(run):
    ckpt = torch.load(run.checkpoint, weights_only=True)  # the resume state too (sampler, RNG, history)
    assert ckpt["step"] == 6 and ckpt["sampler"]["tasks"] == TASKS


def test_a_backend_that_cannot_run_is_refused_at_setup(run, monkeypatch):
    """load_policy(backend="triton") on a CPU machine without the interpreter raises when loading, not at act()."""
    from harmodt_fast import ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops._dispatch, "_decisions", {})
    with pytest.raises(RuntimeError, match="the triton backend cannot run here"):
        hf.load_policy(run, device="cpu", backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        hf.load_policy(run, device="cpu", backend="tpu")


@pytest.mark.parametrize("kw,message", [({"episodes": 2.5}, "episodes must be an integer in 1..50, got 2.5"),
                                        ({"seed": 1.5}, "seed must be an integer in 0.., got 1.5"),
                                        ({"seed": -1}, "seed must be an integer in 0.., got -1"),
                                        ({"workers": -2}, "workers must be an integer in 0.."),
                                        ({"max_envs": 0}, "max_envs must be an integer in 1.."),
                                        ({"merge_threshold": 1.5}, "merge_threshold must be an integer"),
                                        ({"max_episode_steps": True}, "max_episode_steps must be an integer")])
def test_evaluate_refuses_bad_arguments_before_reading_anything(tmp_path, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hf.evaluate(str(tmp_path / "no-such-run"), **kw)  # the arguments are checked before the run is looked for
