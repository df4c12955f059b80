"""Minari datasets through the real minari package, all created by the tests under a temporary
MINARI_DATASETS_PATH: our collected data out and back in, Meta-World environments recovered from them, training and
evaluation on tasks named only by their Minari datasets, clear errors for data that does not fit."""
import numpy as np
import pytest

import harmodt_fast as hf
from harmodt_fast.data import DatasetError

minari = pytest.importorskip("minari")
gym = pytest.importorskip("gymnasium")

TASKS = ["reach-v3", "button-press-v3"]
EPISODES, STEPS = 3, 40


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root / "datasets"))
        yield root


@pytest.fixture(scope="module")
def exported(minari_root):
    ids = hf.collect(TASKS, minari_root / "ours", episodes_per_task=EPISODES, quality="expert", seed=0, workers=1,
                     episode_steps=STEPS, progress=False, verbose=False, format="minari",
                     minari_id="test/{task}-expert-v0")
    return minari_root / "ours", ids


def test_collect_as_minari_round_trips(exported):
    folder, ids = exported
    assert ids == {t: f"minari:test/{t}-expert-v0" for t in TASKS}
    ours, theirs = hf.load_dataset(folder), hf.load_dataset(ids)
    assert theirs.tasks == TASKS and theirs.kind == "minari"
    final = {t: np.load(folder / t / "final_observations.npy") for t in TASKS}
    for task in TASKS:
        a, b = ours.episodes(task), theirs.episodes(task)
        assert len(a) == len(b) == EPISODES
        for e, (ea, eb) in enumerate(zip(a, b)):
            for field in ("observations", "actions", "rewards", "dones", "success"):
                np.testing.assert_array_equal(ea[field], eb[field], err_msg=f"{task} {e} {field}")
            # Minari keeps the observation after the last action: the one our collection recorded
            raw = minari.load_dataset(ids[task].removeprefix("minari:"))
            episode = next(raw.iterate_episodes([e]))
            assert len(episode.observations) == len(episode.actions) + 1
            np.testing.assert_allclose(episode.observations[-1], final[task][e], rtol=1e-6)
    assert any(e["success"].any() for e in theirs.episodes("reach-v3"))  # success flags came from the step infos
    # one dataset by id, and by its folder: the task name comes from the recorded Meta-World environment
    one = hf.load_dataset(ids["reach-v3"])
    assert one.tasks == ["reach-v3"]
    path = minari.load_dataset("test/reach-v3-expert-v0").storage.data_path
    by_folder = hf.load_dataset(str(path))
    assert by_folder.tasks == ["reach-v3"] and by_folder.fingerprint == one.fingerprint
    assert theirs.fingerprint == hf.load_dataset(ids).fingerprint != one.fingerprint


def test_export_needs_the_final_observations(exported, tmp_path):
    import json
    import shutil

    from harmodt_fast.data.minari_data import export_minari

    folder, _ = exported
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if "final_observations" not in k}
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"reach-v3: no final_observations\.npy .*collect it again"):
        export_minari(old, "test/old-{task}-v0")


def test_recover_environment_gives_the_meta_world_env(exported):
    _, ids = exported
    env = minari.load_dataset(ids["button-press-v3"].removeprefix("minari:")).recover_environment()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (39,) and type(env.unwrapped).__name__.startswith("SawyerButtonPress")
    obs, reward, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert "success" in info and np.isfinite(reward)
    env.close()


def make_minari(dataset_id, obs_dim=39, act_dim=4, episodes=4, steps=10, infos=True):
    """A Minari dataset with no environment, random data of the given dimensions."""
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    buffer = []
    for e in range(episodes):
        buffer.append(EpisodeBuffer(
            id=e, observations=rng.normal(size=(steps + 1, obs_dim)).astype(np.float32),
            actions=rng.uniform(-1, 1, size=(steps, act_dim)).astype(np.float32), rewards=rng.random(steps),
            terminations=np.zeros(steps, bool), truncations=np.arange(steps) == steps - 1,
            infos={"success": np.arange(steps + 1) >= steps - 2} if infos else None))
    minari.create_dataset_from_buffers(
        dataset_id, buffer, algorithm_name="random",
        observation_space=gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32),
        action_space=gym.spaces.Box(-1, 1, (act_dim,), np.float32))
    return "minari:" + dataset_id


def test_minari_data_that_does_not_fit_is_a_clear_error(minari_root):
    wrong = make_minari("test/small-obs-v0", obs_dim=5)
    with pytest.raises(DatasetError, match=r"Minari dataset test/small-obs-v0: observation space .*\(39,\)"):
        hf.load_dataset({"reach-v3": wrong})
    with pytest.raises(DatasetError, match=r"Minari dataset 'test/absent-v0' cannot be opened"):
        hf.load_dataset("minari:test/absent-v0")
    plain = hf.load_dataset(make_minari("test/no-infos-v0", infos=False))
    assert plain.tasks == ["test/no-infos-v0"] and not plain.arrays("test/no-infos-v0").success.any()
    flagged = hf.load_dataset(make_minari("test/infos-v0")).episodes("test/infos-v0")[0]["success"]
    assert flagged.tolist() == [False] * 7 + [True] * 3  # infos[1:] are the steps' infos


def test_train_and_evaluate_tasks_named_by_minari_datasets(exported, minari_root):
    _, ids = exported
    data = {"my-reach": ids["reach-v3"], "my-button": ids["button-press-v3"]}
    res = hf.train(data, minari_root / "run", preset="tiny", steps=2, progress=False, precision="fp32",
                   device="cpu")
    report = hf.evaluate(res, episodes=1, max_episode_steps=5, workers=0, precision="fp32")
    assert report["tasks"] == ["my-reach", "my-button"] and report["env_steps"] == 10
    # the same rollout under the Meta-World names gives the same returns: the recovered env is that task's
    policy = hf.load_policy(res, device="cpu", precision="fp32")
    from harmodt_fast.envs import make_env

    env = make_env("reach-v3", 0)
    obs, _ = env.reset()
    policy.reset("my-reach")
    total = 0.0
    for _ in range(5):
        obs, r, *_ = env.step(np.clip(policy.act(obs).astype(np.float64), -1, 1))
        policy.observe(r)
        total += r
    assert report["per_task"]["my-reach"]["returns"][0] == pytest.approx(total, rel=1e-5)

    no_env = hf.train({"mystery": make_minari("test/mystery-v0")}, minari_root / "run2", preset="tiny", steps=1,
                      progress=False, precision="fp32", device="cpu")
    with pytest.raises(ValueError, match=r"task 'mystery' has no environment"):
        hf.evaluate(no_env, episodes=1, max_episode_steps=2, workers=0)


class ToyEnv(gym.Env):
    """A gymnasium environment that is not Meta-World (39-dim observations, 4-dim actions): reward 1 per step,
    success from step 3; the reset seed (the evaluation's goal variant) offsets the observations."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (39,), np.float64)
    action_space = gym.spaces.Box(-1, 1, (4,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.base = 0, float(seed or 0)
        return np.full(39, self.base), {}

    def step(self, action):
        self.t += 1
        return np.full(39, self.base + self.t), 1.0, False, self.t >= 50, {"success": self.t >= 3}


def test_a_recorded_non_meta_world_environment_is_evaluated_in(minari_root):
    from minari.data_collector import EpisodeBuffer

    spec = gym.envs.registration.EnvSpec(id="ToyForTests-v0", entry_point="test_minari:ToyEnv", max_episode_steps=50)
    rng = np.random.default_rng(1)
    buffer = [EpisodeBuffer(id=e, observations=np.arange(11)[:, None] + np.zeros((11, 39)),
                            actions=rng.uniform(-1, 1, (10, 4)).astype(np.float32), rewards=np.ones(10),
                            terminations=np.zeros(10, bool), truncations=np.arange(10) == 9) for e in range(4)]
    minari.create_dataset_from_buffers("test/toy-v0", buffer, env=spec, algorithm_name="random")
    ds = hf.load_dataset("minari:test/toy-v0")
    assert ds.tasks == ["test/toy-v0"] and "ToyForTests-v0" in ds.env_specs["test/toy-v0"]
    res = hf.train(ds, minari_root / "toy-run", preset="tiny", steps=1, progress=False, precision="fp32",
                   device="cpu")
    report = hf.evaluate(res, episodes=2, max_episode_steps=4, workers=0, precision="fp32")
    toy = report["per_task"]["test/toy-v0"]
    assert toy["returns"] == [4.0, 4.0] and toy["successes"] == [1, 1] and toy["lengths"] == [4, 4]
