"""hf.collect: the documented collection rule, determinism across worker counts, resume, manifest, CLI."""
import hashlib
import json
import os
import zlib

import numpy as np
import pytest

import harmodt_fast as hf
from harmodt_fast.data import collection
from harmodt_fast.data.dataset import MANIFEST

TASKS = ["reach-v3", "drawer-close-v3"]
E, STEPS = 4, 30
FILES = ("observations", "actions", "rewards", "dones", "success", "episode_starts", "goal_index", "expert_prob",
         "final_observations")


def _arrays(path):
    return {(t, f): np.load(os.path.join(path, t, f + ".npy")) for t in TASKS for f in FILES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """near-optimal, 2 tasks x 4 episodes x 30 steps, in this process (workers=1)."""
    out = tmp_path_factory.mktemp("collect") / "ref"
    path = collection.collect(TASKS, out, E, quality="near-optimal", seed=7, workers=1, episode_steps=STEPS,
                              progress=False, verbose=False)
    return path


def test_manifest_checksums_and_stats(reference):
    with open(os.path.join(reference, MANIFEST)) as f:
        m = json.load(f)
    from importlib.metadata import version

    assert m["tasks"] == TASKS and m["quality"] == "near-optimal" and m["seed"] == 7
    assert m["episodes_per_task"] == E and m["episode_steps"] == STEPS
    assert m["metaworld_version"] == version("metaworld")
    assert len(m["files"]) == len(TASKS) * len(FILES)
    for rel, entry in m["files"].items():
        with open(os.path.join(reference, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"], rel
    ds = hf.load_dataset(reference)
    assert ds.tasks == TASKS
    for task in TASKS:
        eps = ds.episodes(task)
        assert len(eps) == E and m["counts"][task] == {"episodes": E, "transitions": E * STEPS}
        returns = [sum(float(r) for r in e["rewards"]) for e in eps]
        assert m["stats"][task]["mean_return"] == pytest.approx(np.mean(returns), rel=1e-9)
        assert m["stats"][task]["success_rate"] == pytest.approx(np.mean([e["success"].any() for e in eps]))
        for e in eps:
            assert e["observations"].shape == (STEPS, 39) and e["actions"].shape == (STEPS, 4)
            assert e["dones"].tolist() == [False] * (STEPS - 1) + [True]
            assert np.all(np.abs(e["actions"]) <= 1)
        probs = np.load(os.path.join(reference, task, "expert_prob.npy"))
        np.testing.assert_allclose(probs, np.arange(E) / (E - 1), rtol=1e-6)
    assert not os.path.exists(os.path.join(reference, collection.PARTIAL))


def test_actions_follow_the_documented_rule(reference):
    """Re-derives every step's action from the rule in the README (independent of the collector's loop)."""
    from harmodt_fast.envs import make_env, scripted_policy

    for task in TASKS:
        obs = np.load(os.path.join(reference, task, "observations.npy"))
        act = np.load(os.path.join(reference, task, "actions.npy"))
        goals = np.load(os.path.join(reference, task, "goal_index.npy"))
        policy = scripted_policy(task)
        for i in range(E):
            rng = np.random.default_rng([7, zlib.crc32(task.encode()), i])
            g = rng.integers(50)
            u = rng.random(STEPS)
            noise = rng.normal(0.0, 0.1, size=(STEPS, 4))
            uniform = rng.uniform(-1, 1, size=(STEPS, 4))
            assert goals[i] == g
            first_obs, _ = make_env(task, int(g)).reset()
            np.testing.assert_allclose(obs[i * STEPS], first_obs, rtol=0, atol=1e-6)
            p = i / (E - 1)
            for t in range(STEPS):
                a = act[i * STEPS + t]
                if u[t] < p:
                    expect = np.clip(policy.get_action(obs[i * STEPS + t].astype(np.float64)) + noise[t], -1, 1)
                    np.testing.assert_allclose(a, expect, atol=2e-3, err_msg=f"{task} episode {i} step {t}")
                else:
                    np.testing.assert_array_equal(a, uniform[t].astype(np.float32))


def test_same_arrays_with_two_workers_and_after_resume(reference, tmp_path, monkeypatch):
    ref = _arrays(reference)
    two = collection.collect(TASKS, tmp_path / "two", E, quality="near-optimal", seed=7, workers=2,
                             episode_steps=STEPS, progress=False, verbose=False)
    for key, arr in _arrays(two).items():
        np.testing.assert_array_equal(arr, ref[key], err_msg=str(key))

    # interrupt a chunk-per-episode collection at its third chunk
    real = collection._collect_chunk
    calls = []

    def interrupted(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((job["task"], job["lo"]))
        return real(job)

    out = tmp_path / "resumed"
    monkeypatch.setattr(collection, "_collect_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collection.collect(TASKS, out, E, quality="near-optimal", seed=7, workers=1, episode_steps=STEPS,
                           chunk_episodes=1, progress=False, verbose=False)
    assert not os.path.exists(out / MANIFEST)
    kept = sorted(f for t in TASKS for f in os.listdir(out / collection.PARTIAL / t))
    assert len(kept) == 2

    with pytest.raises(ValueError, match="unfinished collection with different"):
        collection.collect(TASKS, out, E, quality="near-optimal", seed=8, workers=1, episode_steps=STEPS,
                           progress=False, verbose=False)

    redone = []

    def counting(job):
        redone.append((job["task"], job["lo"], job["hi"]))
        return real(job)

    monkeypatch.setattr(collection, "_collect_chunk", counting)
    collection.collect(TASKS, out, E, quality="near-optimal", seed=7, workers=1, episode_steps=STEPS,
                       chunk_episodes=3, progress=False, verbose=False)
    assert sum(hi - lo for _, lo, hi in redone) == len(TASKS) * E - 2  # only the missing episodes
    assert not any((t, lo) in calls for t, lo, _ in redone)
    for key, arr in _arrays(out).items():
        np.testing.assert_array_equal(arr, ref[key], err_msg=str(key))
    assert hf.load_dataset(out).fingerprint == hf.load_dataset(reference).fingerprint


def test_sub_optimal_is_the_first_half_of_the_ramp(reference, tmp_path):
    sub = collection.collect(TASKS, tmp_path / "sub", E // 2, quality="sub-optimal", seed=7, workers=1,
                             episode_steps=STEPS, progress=False, verbose=False)
    ref, half = _arrays(reference), _arrays(sub)
    n = E // 2 * STEPS
    for task in TASKS:
        for f in ("observations", "actions", "rewards", "success"):
            np.testing.assert_array_equal(half[task, f], ref[task, f][:n])
        np.testing.assert_array_equal(half[task, "expert_prob"], ref[task, "expert_prob"][: E // 2])


def test_finished_folder_is_reused_and_other_arguments_refused(reference, capsys):
    assert collection.collect(TASKS, reference, E, quality="near-optimal", seed=7, workers=1,
                              episode_steps=STEPS, progress=False) == reference
    assert "mean over tasks" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"different \['quality'\]"):
        collection.collect(TASKS, reference, E, quality="expert", seed=7, episode_steps=STEPS, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quality="great"), "unknown quality"),
    (dict(episode_steps=0), "episode_steps"),
    (dict(episode_steps=501), "episode_steps"),
    (dict(tasks=["reach-v9"]), "unknown Meta-World task"),
    (dict(episodes_per_task=0), "episodes_per_task"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(tasks=["reach-v3"], out=tmp_path / "x", episodes_per_task=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hf.collect(**args)


def test_cli_collect(tmp_path, capsys):
    from harmodt_fast.cli import main

    out = str(tmp_path / "cli")
    assert main(["collect", "--tasks", "reach-v3", "--out", out, "--episodes", "1", "--episode-steps", "12",
                 "--quality", "expert", "--workers", "1", "--no-progress"]) == 0
    assert "reach-v3" in capsys.readouterr().out
    ds = hf.load_dataset(out)
    assert ds.tasks == ["reach-v3"] and ds.manifest["quality"] == "expert"
    assert len(ds.episodes("reach-v3")[0]["rewards"]) == 12
    assert main(["collect", "--tasks", "nope-v3", "--out", out + "2", "--episodes", "1"]) == 2
    assert "unknown Meta-World task" in capsys.readouterr().err


def test_model_consumes_a_sampled_batch_of_collected_data(reference):
    import torch

    from harmodt_fast.data import MultiTaskSampler

    ds = hf.load_dataset(reference)
    cfg = hf.HarmoDTConfig.from_preset("tiny", tasks=ds.tasks, dropout=0.0)
    s = MultiTaskSampler(ds, cfg, seed=0)
    batch = s.sample()
    model = hf.HarmoDT(cfg)
    losses = model.task_losses(batch)
    assert losses.shape == (2,) and torch.isfinite(losses).all() and torch.all(losses > 0)
    assert hf.ops.last_backend("masked_linear") in hf.ops.available_backends()
    losses.sum().backward()
