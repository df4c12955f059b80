"""Minari datasets in and out (`pip install 'harmodt_fast[minari]'`), read and written through the minari package.

In: `load_dataset("minari:<dataset_id>")` (a dataset under MINARI_DATASETS_PATH, default ~/.minari/datasets), a
local Minari dataset folder (the one holding `data/`), or a multi-task dataset `{task_name: dataset_id or folder}`.
A Minari episode holds one more observation than actions (the last one comes after the last action): it is dropped.
dones = terminations | truncations; success = the step infos' "success" where the dataset recorded it (infos[0]
is the reset's), else False. A single dataset's task name is the Meta-World task of its environment when it is
one of ours, else the dataset id. The fingerprint hashes every file of each dataset's `data/` folder.

Out: `export_minari(our_dataset_folder, "harmodt_fast/{task}-v0")` writes one Minari dataset per task, whose
`recover_environment()` builds the task's Meta-World environment (entry point `harmodt_fast.envs:make_gym_env`, a
module path: Minari cannot serialise Meta-World's own lambda entry points). Meta-World v3 never terminates an
episode, so the last step of every episode is a truncation. `hf.collect(..., format="minari")` collects and exports.
"""
from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np

from harmodt_fast.data.dataset import ACT_DIM, STATE_DIM, Dataset, TaskData, file_sha256, load_folder, read_checked_npy
from harmodt_fast.data.validation import DatasetError, check_task_names, validate_episode_arrays

PREFIX = "minari:"
ENTRY_POINT = "harmodt_fast.envs:make_gym_env"


def _minari():
    try:
        import minari
    except ImportError as exc:
        raise ImportError("Minari datasets need the minari package: pip install 'harmodt_fast[minari]'") from exc
    return minari


def is_minari_source(source) -> bool:
    """A "minari:<id>" string, a {task: dataset} dict, or a folder that holds a Minari dataset (no import)."""
    if isinstance(source, dict):
        return True
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        return s.startswith(PREFIX) or _data_folder(s) is not None
    return False


def _data_folder(path: str) -> str | None:
    for folder in (os.path.join(path, "data"), path):
        if os.path.isfile(os.path.join(folder, "metadata.json")) and any(
                f.startswith("main_data") for f in os.listdir(folder)):
            return folder
    return None


def _open(ref: str):
    """(MinariDataset, name for messages) of "minari:<id>", a bare dataset id or a dataset folder."""
    minari = _minari()
    ref = os.fspath(ref)
    folder = None if ref.startswith(PREFIX) else _data_folder(ref)
    if folder is not None:
        return minari.MinariDataset(folder), ref
    dataset_id = ref.removeprefix(PREFIX)
    try:
        return minari.load_dataset(dataset_id), dataset_id
    except Exception as exc:  # minari raises bare FileNotFoundError / ValueError with its own wording
        raise DatasetError(f"Minari dataset {dataset_id!r} cannot be opened (under "
                           f"{os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}): "
                           f"{type(exc).__name__}: {exc}") from exc


def _meta_world_task(env_spec) -> str | None:
    if env_spec is not None and env_spec.entry_point == ENTRY_POINT:
        return env_spec.kwargs.get("task")
    return None


class MinariTaskDataset(Dataset):
    """A Dataset whose tasks are Minari datasets (one per task); `.env_specs` {task: EnvSpec JSON} where the
    dataset recorded its environment."""

    def __init__(self, sources: dict, max_episodes: int | None = None):
        check_task_names(list(sources), "the {task: Minari dataset} mapping", plain=False)  # not used as paths
        self._minari, self.env_specs, self._hashes = {}, {}, {}
        for task, ref in sources.items():
            ds, name = _open(ref)
            obs_space, act_space = ds.observation_space, ds.action_space
            if getattr(obs_space, "shape", None) != (STATE_DIM,) or getattr(act_space, "shape", None) != (ACT_DIM,):
                raise DatasetError(f"Minari dataset {name}: observation space {obs_space} and action space "
                                   f"{act_space} do not match the model's ({STATE_DIM},) observations and "
                                   f"({ACT_DIM},) actions (Meta-World's)")
            self._minari[task] = (ds, name)
            env_spec = ds.spec.env_spec
            if env_spec is not None:
                self.env_specs[task] = env_spec.to_json()
            data = ds.storage.data_path
            h = hashlib.sha256()
            for f in sorted(os.listdir(data)):
                if os.path.isfile(os.path.join(data, f)):
                    h.update(f"{f}:{file_sha256(os.path.join(data, f))}\n".encode())
            self._hashes[task] = h.hexdigest()
        super().__init__(",".join(name for _, name in self._minari.values()), "minari", list(sources),
                         max_episodes=max_episodes)

    def _read(self, task: str) -> TaskData:
        ds, name = self._minari[task]
        ids = sorted(ds.episode_indices)[: self.max_episodes]
        parts = []
        for ep in ds.iterate_episodes(ids):
            n = len(ep.actions)
            obs = np.asarray(ep.observations)
            where = f"Minari dataset {name} episode {ep.id}"
            if obs.shape[:1] != (n + 1,):
                raise DatasetError(f"{where}: observations of shape {obs.shape} for {n} actions (expected one "
                                   f"more observation)")
            terminations, truncations = np.asarray(ep.terminations), np.asarray(ep.truncations)
            info_success = (ep.infos or {}).get("success")
            info_success = None if info_success is None else np.asarray(info_success).reshape(-1)
            success = info_success[1:] if info_success is not None and len(info_success) == n + 1 else np.zeros(n, bool)
            actions, rewards = np.asarray(ep.actions), np.asarray(ep.rewards)
            validate_episode_arrays(where, obs[:-1], actions, rewards, terminations, success,
                                    {"truncations": truncations})
            parts.append((obs[:-1].astype(np.float32), actions.astype(np.float32), rewards.astype(np.float32),
                          terminations.astype(bool) | truncations.astype(bool), success.astype(bool)))
        if not parts:
            raise DatasetError(f"Minari dataset {name}: no episodes")
        lengths = np.array([len(p[0]) for p in parts], np.int64)
        return TaskData(*(np.concatenate([p[i] for p in parts]) for i in range(5)),
                        episode_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for task in self.tasks:
            h.update(f"{task}:{self._hashes[task]}\n".encode())
        if self.max_episodes is not None:
            h.update(f"max_episodes={self.max_episodes}".encode())
        return h.hexdigest()


def load_minari(source, max_episodes: int | None = None) -> MinariTaskDataset:
    """A Dataset from "minari:<id>", a Minari dataset folder or {task_name: id or folder}."""
    if isinstance(source, dict):
        if not source:
            raise DatasetError("an empty {task: Minari dataset} mapping")
        bad = [t for t, r in source.items() if not isinstance(r, (str, os.PathLike))]
        if bad:
            raise DatasetError(f"the {{task: Minari dataset}} mapping: task {bad[0]!r} names {source[bad[0]]!r}, "
                               f"not a dataset id or folder")
        return MinariTaskDataset({t: os.fspath(r) for t, r in source.items()}, max_episodes)
    ds, name = _open(source)
    task = _meta_world_task(ds.spec.env_spec) or name
    return MinariTaskDataset({task: os.fspath(source)}, max_episodes)


# ---- out ----------------------------------------------------------------------------------------------------------
def env_spec(task: str):
    """The gymnasium EnvSpec of a Meta-World task by module path (serialisable into a Minari dataset)."""
    import gymnasium as gym

    from harmodt_fast.envs import MAX_EPISODE_STEPS

    return gym.envs.registration.EnvSpec(id=f"harmodt_fast/{task}", entry_point=ENTRY_POINT,
                                         kwargs={"task": task}, max_episode_steps=MAX_EPISODE_STEPS)


def check_dataset_id(dataset_id) -> None:
    """A Minari dataset id pattern with '{task}' (one Minari dataset per task); else a ValueError."""
    if not isinstance(dataset_id, str) or "{task}" not in dataset_id:
        raise ValueError(f"dataset_id must contain '{{task}}' (one Minari dataset per task), got {dataset_id!r}")


def export_minari(dataset, dataset_id: str = "harmodt_fast/{task}-v0", tasks=None) -> dict[str, str]:
    """Writes every task of one of our dataset folders as a Minari dataset `dataset_id.format(task=...)` (under
    MINARI_DATASETS_PATH); returns {task: "minari:<id>"}, which load_dataset reads back as one dataset."""
    minari = _minari()
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    ds = load_folder(dataset) if not isinstance(dataset, Dataset) else dataset
    if ds.kind != "harmodt_fast":
        raise DatasetError(f"{ds.path}: only datasets collected by hf.collect can be exported to Minari (they keep "
                           f"each episode's last observation); this one is {ds.kind}")
    check_dataset_id(dataset_id)
    out = {}
    for task in tasks or ds.tasks:
        rel = f"{task}/final_observations.npy"
        if rel not in ds.manifest["files"]:
            raise DatasetError(f"{os.path.join(ds.path, task)}: no final_observations.npy (collected by an older "
                               f"version); collect it again to export it to Minari")
        final = read_checked_npy(ds.path, rel, ds.manifest["files"][rel], ds.verify)
        d = ds.arrays(task)
        spec = env_spec(task)
        env = gym.make(spec)
        obs_dtype = env.observation_space.dtype
        buffer = []
        for e in range(d.num_episodes):
            lo, hi = int(d.episode_starts[e]), int(d.episode_starts[e + 1])
            n = hi - lo
            truncations = np.zeros(n, bool)
            truncations[-1] = True
            buffer.append(EpisodeBuffer(
                id=e, observations=np.concatenate([d.observations[lo:hi], final[e : e + 1]]).astype(obs_dtype),
                actions=np.asarray(d.actions[lo:hi]), rewards=np.asarray(d.rewards[lo:hi], np.float64),
                terminations=np.zeros(n, bool), truncations=truncations,
                infos={"success": np.concatenate([[False], d.success[lo:hi]])}))
        name = dataset_id.format(task=task)
        with warnings.catch_warnings():  # minari's advice about author e-mail, code links and eval envs
            warnings.filterwarnings("ignore", category=UserWarning, module="minari")
            minari.create_dataset_from_buffers(
                name, buffer, env=env, algorithm_name="harmodt_fast.collect (Meta-World scripted experts)",
                author="harmodt_fast",
                description=f"{task} from harmodt_fast dataset {ds.path} (fingerprint {ds.fingerprint[:16]})")
        env.close()
        out[task] = PREFIX + name
    return out
