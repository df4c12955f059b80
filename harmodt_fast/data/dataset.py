"""Offline datasets on disk: our collected format and the MTDiff per-episode layout, read into flat arrays.

Our format (written by `hf.collect`): a folder with `manifest.json` and one sub-folder per task holding `.npy`
files (loadable with `np.load(..., mmap_mode="r")`, so a 50M-transition MT50 dataset is never copied to read it):
    observations [N, 39] float32   actions [N, 4] float32   rewards [N] float32
    dones [N] bool                  success [N] bool         (N = all transitions of the task, episodes back to back)
    episode_starts [E + 1] int64   (episode e is rows episode_starts[e]:episode_starts[e+1])
    goal_index [E] int32            expert_prob [E] float32  (how each episode was collected)
    final_observations [E, 39] float32  (the observation after each episode's last action; older datasets lack it)
The manifest lists every data file with its sha256; a file is hashed again when it is read, so damage anywhere in
it is a DatasetError, not training data. What is checked besides: harmodt_fast.data.validation.

MTDiff layout (the published replay buffers): `{task}/{i}.npz` per episode with `observations`, `actions`,
`rewards` and `dones` or `terminals` (optionally `success`); task folders may use v1/v2/v3 names.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np

from harmodt_fast._io import read_json_format
from harmodt_fast.data.validation import (
    EPISODE_FIELDS, REQUIRED_FIELDS, STEP_FIELDS, DatasetError, check_episode_starts, check_manifest, check_npy_file,
    check_manifest_size, check_npz_episode, check_task_names, mtdiff_episode_files, task_key, validate_episode_arrays,
)

__all__ = ["ACT_DIM", "EPISODE_FIELDS", "FORMAT", "MANIFEST", "STATE_DIM", "STEP_FIELDS", "Dataset", "DatasetError",
           "TaskData", "common_dims", "file_sha256", "load_folder", "read_checked_npy", "read_manifest",
           "validate_episode_arrays"]

FORMAT = "harmodt_fast-dataset/1"
MANIFEST = "manifest.json"
STATE_DIM = 39  # Meta-World's dimensions: what collection writes; loaded data may have others
ACT_DIM = 4
_HASH_BLOCK = 1 << 24


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_HASH_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


@dataclass
class TaskData:
    """One task's transitions, episodes back to back (numpy arrays, possibly memory-mapped)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    success: np.ndarray
    episode_starts: np.ndarray  # [E + 1] int64

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts) - 1

    @property
    def num_transitions(self) -> int:
        return int(self.episode_starts[-1])

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_starts)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, float64 [E]."""
        sums = np.concatenate([[0.0], np.cumsum(self.rewards, dtype=np.float64)])
        return sums[self.episode_starts[1:]] - sums[self.episode_starts[:-1]]

    def episode_success(self) -> np.ndarray:
        """Whether `success` was ever true in each episode, bool [E]."""
        counts = np.concatenate([[0], np.cumsum(self.success, dtype=np.int64)])
        return (counts[self.episode_starts[1:]] - counts[self.episode_starts[:-1]]) > 0


def common_dims(task_data: dict, where) -> tuple[int, int]:
    """(state_dim, act_dim) shared by every task's TaskData; DatasetError naming the tasks when they disagree."""
    seen = {t: (int(d.observations.shape[1]), int(d.actions.shape[1])) for t, d in task_data.items()}
    if len(set(seen.values())) > 1:
        raise DatasetError(f"{where}: tasks disagree on (state dim, action dim): {seen}")
    return next(iter(seen.values()))


class Dataset:
    """An offline multi-task dataset: `.tasks` (v3 names), `.episodes(task)`, `.arrays(task)`, `.fingerprint`."""

    def __init__(self, path: str, kind: str, tasks: list[str], manifest: dict | None = None,
                 verify: bool = True, max_episodes: int | None = None, sources: dict | None = None):
        self.path = path
        self.kind = kind  # "harmodt_fast" | "mtdiff"
        self.tasks = list(tasks)
        self.manifest = manifest
        self.verify = verify
        self.max_episodes = max_episodes
        self._sources = sources or {}  # mtdiff: task -> [episode files]
        self._data: dict[str, TaskData] = {}
        self._mtdiff_hashes: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Dataset({self.path!r}, {self.kind}, {len(self.tasks)} tasks)"

    def _task_name(self, task: str) -> str:
        key = task if task in self.tasks else task_key(task)
        if key not in self.tasks:
            raise KeyError(f"task {task!r} is not in the dataset {self.path} (tasks: {self.tasks})")
        return key

    def dims(self, tasks=None) -> tuple[int, int]:
        """(state_dim, act_dim) of the data; DatasetError naming the tasks when they disagree."""
        return common_dims({t: self.arrays(t) for t in tasks or self.tasks}, self.path)

    def arrays(self, task: str) -> TaskData:
        """The task's transitions as flat arrays (read, checked and cached on first use)."""
        task = self._task_name(task)
        if task not in self._data:
            data = self._read(task)
            if self.max_episodes is not None and data.num_episodes > self.max_episodes:
                data = _first_episodes(data, self.max_episodes)
            self._data[task] = data
        return self._data[task]

    def episodes(self, task: str) -> list[dict]:
        """One dict of arrays per episode (`observations` [T,39], `actions` [T,4], `rewards`, `dones`, `success`
        [T]); views into the task's flat arrays, nothing copied."""
        d = self.arrays(task)
        starts = d.episode_starts
        out = []
        for e in range(d.num_episodes):
            lo, hi = int(starts[e]), int(starts[e + 1])
            out.append({f: getattr(d, f)[lo:hi] for f in STEP_FIELDS})
        return out

    def _read(self, task: str) -> TaskData:
        return self._read_ours(task) if self.kind == "harmodt_fast" else self._read_mtdiff(task)

    def num_episodes(self, task: str) -> int:
        return self.arrays(task).num_episodes

    @property
    def fingerprint(self) -> str:
        """Changes when the data changes: a hash of the manifest's file checksums (our format) or of every
        episode file's bytes (MTDiff layout, computed when the files are read)."""
        h = hashlib.sha256()
        if self.kind == "harmodt_fast":
            h.update(json.dumps(self.manifest["files"], sort_keys=True).encode())
        else:
            for task in self.tasks:
                self.arrays(task)
                h.update(f"{task}:{self._mtdiff_hashes[task]}\n".encode())
        if self.max_episodes is not None:
            h.update(f"max_episodes={self.max_episodes}".encode())
        return h.hexdigest()

    # our format ------------------------------------------------------------------------------------------------
    def _read_ours(self, task: str) -> TaskData:
        files = self.manifest["files"]
        arrays = {}
        for field in REQUIRED_FIELDS:
            rel = f"{task}/{field}.npy"
            arrays[field] = read_checked_npy(self.path, rel, files.get(rel), self.verify)
        name = os.path.join(self.path, task)
        validate_episode_arrays(name, arrays["observations"], arrays["actions"], arrays["rewards"],
                                arrays["dones"], arrays["success"])
        starts = check_episode_starts(os.path.join(name, "episode_starts.npy"), arrays["episode_starts"],
                                      len(arrays["observations"]))
        return TaskData(**{f: arrays[f] for f in STEP_FIELDS}, episode_starts=starts)

    # MTDiff layout ---------------------------------------------------------------------------------------------
    def _read_mtdiff(self, task: str) -> TaskData:
        files = self._sources[task]
        if self.max_episodes is not None:
            files = files[: self.max_episodes]
        h = hashlib.sha256()
        episodes = []
        for fname in files:
            with open(fname, "rb") as f:
                raw = f.read()
            h.update(raw)
            episodes.append(_read_mtdiff_episode(fname, raw))
            first, last = episodes[0], episodes[-1]
            if (last[0].shape[1], last[1].shape[1]) != (first[0].shape[1], first[1].shape[1]):
                raise DatasetError(f"{fname}: observations have shape {tuple(last[0].shape)}, actions have shape "
                                   f"{tuple(last[1].shape)}, but {files[0]} has state dim {first[0].shape[1]} and "
                                   f"action dim {first[1].shape[1]}: the episodes of a task must agree")
        self._mtdiff_hashes[task] = h.hexdigest()
        lengths = np.array([len(e[0]) for e in episodes], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = [np.concatenate([e[i] for e in episodes]) for i in range(5)]
        return TaskData(*cat, episode_starts=starts)


def _read_mtdiff_episode(fname: str, raw: bytes):
    check_npz_episode(fname, raw)  # before any array is allocated
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("observations", "actions", "rewards") if k not in keys]
            done_key = "dones" if "dones" in keys else "terminals" if "terminals" in keys else None
            if missing or done_key is None:
                raise DatasetError(f"{fname}: missing arrays {missing + ([] if done_key else ['dones/terminals'])}; "
                                   f"has {sorted(keys)}")
            obs, act, rew, done = (z[k] for k in ("observations", "actions", "rewards", done_key))
            succ = z["success"] if "success" in keys else None
    except DatasetError:
        raise
    except Exception as exc:  # zipfile and zlib raise their own errors for damaged members (CRC, deflate)
        raise DatasetError(f"{fname}: cannot be read as an .npz episode ({type(exc).__name__}: {exc})") from exc
    # replay buffers often store per-step scalars as [T, 1]
    rew = rew.reshape(len(rew)) if rew.ndim == 2 and rew.shape[1:] == (1,) else rew
    done = done.reshape(len(done)) if done.ndim == 2 and done.shape[1:] == (1,) else done
    if succ is not None and succ.ndim == 2 and succ.shape[1:] == (1,):
        succ = succ.reshape(len(succ))
    validate_episode_arrays(fname, obs, act, rew, done, succ)
    if succ is None:
        succ = np.zeros(len(obs), dtype=bool)  # not recorded in this layout
    return (obs.astype(np.float32), act.astype(np.float32), rew.astype(np.float32), done.astype(bool),
            succ.astype(bool))


def _first_episodes(d: TaskData, n: int) -> TaskData:
    end = int(d.episode_starts[n])
    return TaskData(*(getattr(d, f)[:end] for f in STEP_FIELDS), episode_starts=d.episode_starts[: n + 1])


def read_checked_npy(root: str, rel: str, entry: dict | None, verify: bool = True) -> np.ndarray:
    """Memory-maps `root/rel` after checking it against its manifest entry (sha256, size, shape, dtype)."""
    path = os.path.join(root, rel)
    if entry is None:
        raise DatasetError(f"{path}: not listed in {os.path.join(root, MANIFEST)}")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing (listed in the manifest)")
    size = os.path.getsize(path)  # the entry's types were checked with the manifest
    if size != entry["bytes"]:
        raise DatasetError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    if verify:
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise DatasetError(f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest "
                               f"{entry['sha256'][:12]}...): the file is damaged")
    check_npy_file(path)  # its header declares exactly its size, whatever verify says
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot be read as .npy ({exc})") from exc
    if list(arr.shape) != list(entry["shape"]) or str(arr.dtype) != entry["dtype"]:
        raise DatasetError(f"{path}: shape {list(arr.shape)} dtype {arr.dtype}, the manifest says "
                           f"{entry['shape']} {entry['dtype']}")
    return arr


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    check_manifest_size(mpath)
    try:
        manifest = read_json_format(mpath, FORMAT, "harmodt_fast dataset manifest", DatasetError)
    except RecursionError as exc:  # json's decoder on deeply nested arrays
        raise DatasetError(f"{mpath}: cannot be read as JSON (nested too deeply)") from exc
    check_manifest(manifest, mpath)
    return manifest


def load_folder(path, verify: bool = True, max_episodes: int | None = None) -> Dataset:
    """Opens a dataset folder: ours (has manifest.json) or the MTDiff layout (`{task}/{i}.npz`). (Minari data
    comes in through harmodt_fast.data.load_dataset.)

    Files are read, checked and cached per task on first use (`ds.episodes(task)` / `ds.arrays(task)`).
    verify: hash every file of our format against the manifest when it is read (sha256, ~1.7 GB/s).
    max_episodes: keep only the first n episodes of every task (the MTDiff "sub-optimal" split is the first half
    of each replay buffer).
    """
    if max_episodes is not None and max_episodes < 1:
        raise ValueError(f"max_episodes must be >= 1, got {max_episodes}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: no such dataset folder")
    if os.path.exists(os.path.join(path, MANIFEST)):
        manifest = read_manifest(path)
        return Dataset(path, "harmodt_fast", manifest["tasks"], manifest, verify, max_episodes)

    sources: dict[str, list[str]] = {}
    for entry in sorted(os.listdir(path)):
        folder = os.path.join(path, entry)
        if not os.path.isdir(folder) or entry.startswith("."):
            continue
        files = mtdiff_episode_files(folder)
        if files:
            sources[entry] = files
    if not sources:
        raise DatasetError(f"{path}: neither a {MANIFEST} nor task folders with {{i}}.npz episode files")
    check_task_names(list(sources), path)  # also: two folders of one Meta-World task (reach-v2, reach-v3)
    sources = {task_key(entry): files for entry, files in sources.items()}
    from harmodt_fast.tasks import TASK_SETS

    order = {t: i for i, t in enumerate(TASK_SETS["MT50"])}  # the paper's order, as hf.TASK_SETS lists tasks
    tasks = sorted(sources, key=lambda t: (order.get(t, len(order)), t))  # then other names, sorted
    return Dataset(path, "mtdiff", tasks, None, verify, max_episodes, sources)
