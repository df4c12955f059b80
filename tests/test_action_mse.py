"""Held-out action MSE: windows built as the sampler builds training rows (checked against the sampler's own
tensors), every step scored once, the result independent of the forward's row count, the cache in the run."""
import json
import os

import numpy as np
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.action_mse import ACTION_MSE_NAME, action_mse, cached_action_mse, expert_windows
from harmodt_fast.checkpoint import read_run
from helpers import POLICY_TASKS, train_tiny_policy_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mse")
    result = train_tiny_policy_run(root)
    held_out = hf.collect(POLICY_TASKS, root / "expert", episodes_per_task=2, quality="expert", seed=5, workers=1,
                          episode_steps=23, progress=False, verbose=False)
    return root, result, held_out


def test_windows_are_the_samplers_training_rows(run):
    # on the run's own training data the run's statistics are the sampler's: every window step must equal the
    # sampler's normalised state, clipped action and scaled return-to-go of that transition
    root, _, _ = run
    state, _ = read_run(root / "run")
    cfg = state.harmodt_config()
    data = hf.load_dataset(root / "data")
    sampler = hf.MultiTaskSampler(data, cfg)
    base = 0
    for t, task in enumerate(POLICY_TASKS):
        arrays = data.arrays(task)
        w = expert_windows(arrays, cfg.context, cfg.max_ep_len, cfg.rtg_scale, state.state_mean[t], state.state_std[t])
        valid = w["attention_mask"]
        assert int(valid.sum()) == arrays.num_transitions  # every step once
        n = arrays.num_transitions
        torch.testing.assert_close(w["states"][valid], sampler._obs[base : base + n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w["actions"][valid], sampler._act[base : base + n])
        torch.testing.assert_close(w["returns_to_go"][valid][:, 0], sampler._rtg[base : base + n])
        # padding on the left only, zeros there; timesteps count from each episode's start
        assert bool((valid.int().diff(dim=1) >= 0).all()) and float(w["states"][~valid].abs().sum()) == 0.0
        starts = arrays.episode_starts
        expected_steps = np.concatenate([np.arange(b - a) for a, b in zip(starts[:-1], starts[1:])])
        assert w["timesteps"][valid].tolist() == expected_steps.tolist()
        base += n


def test_action_mse_is_the_training_loss_on_held_out_episodes(run):
    root, _, held_out = run
    whole = action_mse(root / "run", held_out)
    assert set(whole["per_task"]) == set(POLICY_TASKS) and whole["steps"] == {t: 2 * 23 for t in POLICY_TASKS}
    assert all(0 < v < 4 for v in whole["per_task"].values())  # tanh actions in [-1, 1]: squared error below 4
    assert whole["mean"] == pytest.approx(np.mean(list(whole["per_task"].values())))
    # a forward of 3 windows at a time gives the same numbers (chunks are weighted by their valid steps)
    chunked = action_mse(root / "run", held_out, rows=3)
    for task in POLICY_TASKS:
        assert chunked["per_task"][task] == pytest.approx(whole["per_task"][task], rel=1e-5)
    state, _ = read_run(root / "run")
    assert whole["checkpoint_step"] == state.step == 6


def test_the_cache_is_kept_and_redone_for_other_data(run):
    root, _, held_out = run
    first = cached_action_mse(str(root / "run"), held_out)
    path = root / "run" / ACTION_MSE_NAME
    assert json.load(open(path)) == first and first["expert_data"] == os.path.basename(held_out)
    mtime = os.path.getmtime(path)
    assert cached_action_mse(str(root / "run"), held_out) == first and os.path.getmtime(path) == mtime
    other = cached_action_mse(str(root / "run"), str(root / "data"))  # another folder: computed again
    assert other["expert_data"] == "data" and other["per_task"] != first["per_task"]


def test_missing_task_is_named(run, tmp_path):
    root, _, _ = run
    one = hf.collect(["reach-v3"], tmp_path / "one", episodes_per_task=1, quality="expert", seed=5, workers=1,
                     episode_steps=10, progress=False, verbose=False)
    with pytest.raises(ValueError, match=r"no episodes of task\(s\) \['button-press-v3'\]"):
        action_mse(root / "run", one)
