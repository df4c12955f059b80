"""Datasets may name any tasks, in any number, with any (shared) state and action dimensions: training,
checkpoints and resume work for them; evaluation says clearly that such a task has no environment."""
import json

import numpy as np
import pytest

import harmodt_fast as hf

TASKS = ["gamma", "alpha", "beta-7"]  # not Meta-World's: kept as they are (the MTDiff folders sort them)


def write_mtdiff(root, tasks, state_dim=7, act_dim=2, episodes=3, steps=12, seed=0, odd=None):
    rng = np.random.default_rng(seed)
    for task in tasks:
        S = state_dim + (1 if task == odd else 0)
        (root / task).mkdir(parents=True)
        for i in range(episodes):
            np.savez(root / task / f"{i}.npz", observations=rng.normal(size=(steps, S)).astype(np.float32),
                     actions=rng.uniform(-1, 1, size=(steps, act_dim)).astype(np.float32),
                     rewards=rng.uniform(0, 1, size=steps).astype(np.float32),
                     dones=np.eye(1, steps, steps - 1, dtype=bool).reshape(steps))
    return root


def test_train_resume_and_checkpoint_on_tasks_of_any_name(tmp_path):
    data = write_mtdiff(tmp_path / "data", TASKS)
    ds = hf.load_dataset(data)
    assert ds.tasks == sorted(TASKS) and ds.dims() == (7, 2)
    kw = dict(preset="tiny", steps=6, mask_interval=2, progress=False, precision="fp32", eval_every=0)
    first = hf.train(data, tmp_path / "run", stop_at=3, **kw)
    assert first.step == 3
    done = hf.train(data, tmp_path / "run", **kw)
    assert done.step == 6 and done.config.tasks == tuple(sorted(TASKS))
    assert (done.config.state_dim, done.config.act_dim) == (7, 2)
    assert done.masks.num_tasks == 3
    updates = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if "mask_update" in l]
    assert updates and all(u["mask_update"]["density"] > 0 for u in updates)
    with pytest.raises(ValueError, match="no environment|not Meta-World"):
        hf.evaluate(done, episodes=1, max_episode_steps=5, workers=0)


def test_a_subset_of_tasks_by_name(tmp_path):
    data = write_mtdiff(tmp_path / "data", TASKS)
    res = hf.train(data, tmp_path / "run", preset="tiny", steps=2, tasks="alpha,gamma", progress=False)
    assert res.config.tasks == ("alpha", "gamma")


def test_tasks_that_disagree_on_dimensions_are_refused_before_work(tmp_path):
    data = write_mtdiff(tmp_path / "data", TASKS, odd="beta-7")
    with pytest.raises(hf.DatasetError, match=r"disagree on \(state dim, action dim\).*beta-7.*\(8, 2\)"):
        hf.train(data, tmp_path / "run", preset="tiny", steps=2, progress=False)
    with pytest.raises(ValueError, match="do not match the model's"):
        hf.train(write_mtdiff(tmp_path / "ok", TASKS), tmp_path / "run2", preset="tiny", steps=2, state_dim=39)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
