"""Replay-like offline data from Meta-World's scripted experts: `hf.collect` and `harmodt-fast collect`.

The rule (also in the README, "Datasets"). Episode i of a task (i = 0..E-1) runs `episode_steps` steps (500, the
env's limit) on goal variant g_i, drawn uniformly from the task's 50 goal variants. At every step the action is,
with probability p_i, the scripted expert's action plus Gaussian noise N(0, EXPERT_NOISE^2) per dimension, and
otherwise an action drawn uniformly from [-1, 1]^4 (what an RL learner's early buffer holds); then clipped to [-1, 1].
    expert:        p_i = 1
    near-optimal:  p_i = i / (E - 1)      (the whole ramp from a random to a converged policy; p = 1 when E = 1)
    sub-optimal:   p_i = i / (2E - 1)     (the first half of the near-optimal ramp over 2E episodes)
Every random number of episode i comes from one generator seeded with (seed, crc32(task), i), drawn in a fixed
order that does not depend on p_i: the same seed gives the same arrays whatever the worker count or chunking, and
sub-optimal with E episodes is exactly the first E episodes of near-optimal with 2E.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shutil
import time
import zlib

import numpy as np

from harmodt_fast.data.dataset import (
    ACT_DIM, FORMAT, MANIFEST, STATE_DIM, STEP_FIELDS, DatasetError, file_sha256, read_manifest,
)
from harmodt_fast._io import atomic_write, folder_lock
from harmodt_fast.runtime import integer_in, progress_bar
from harmodt_fast.tasks import resolve_tasks

QUALITIES = ("expert", "near-optimal", "sub-optimal")
EXPERT_NOISE = 0.1
PARTIAL = ".partial"
_CHUNK_RE = re.compile(r"(\d+)-(\d+)\.npz")


def expert_probability(quality: str, episode: int, episodes: int) -> float:
    """p_i: the probability that a step of episode `episode` (of `episodes`) takes the expert's action."""
    if quality == "expert":
        return 1.0
    if quality == "near-optimal":
        return episode / (episodes - 1) if episodes > 1 else 1.0
    if quality == "sub-optimal":
        return episode / (2 * episodes - 1)
    raise ValueError(f"unknown quality {quality!r}; expected one of {QUALITIES}")


def episode_rng(seed: int, task: str, episode: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(episode)])


class _TaskRunner:
    """One task's env and scripted policy, reused across episodes (a fresh env gives bit-identical episodes:
    checked by the determinism test across worker counts)."""

    def __init__(self, task: str):
        from harmodt_fast.envs import goal_variants, make_env, scripted_policy

        self.task = task
        self.env = make_env(task, 0)
        self.variants = goal_variants(task)
        self.policy = scripted_policy(task)

    def run(self, p_expert: float, rng: np.random.Generator, steps: int, goal_index: int | None = None) -> dict:
        # fixed draw order, independent of p_expert (see the module docstring)
        g = int(rng.integers(len(self.variants)))
        u = rng.random(steps)
        noise = rng.normal(0.0, EXPERT_NOISE, size=(steps, ACT_DIM))
        uniform = rng.uniform(-1.0, 1.0, size=(steps, ACT_DIM))
        reset_seed = int(rng.integers(2**31))
        if goal_index is not None:
            g = goal_index
        env = self.env
        env.set_task(self.variants[g])
        obs, _ = env.reset(seed=reset_seed)
        out_obs = np.empty((steps, STATE_DIM), np.float32)
        out_act = np.empty((steps, ACT_DIM), np.float32)
        out_rew = np.empty(steps, np.float32)
        out_done = np.zeros(steps, bool)
        out_succ = np.zeros(steps, bool)
        take_expert = u < p_expert
        T = steps
        for t in range(steps):
            out_obs[t] = obs
            if take_expert[t]:
                a = self.policy.get_action(obs) + noise[t]
            else:
                a = uniform[t]
            a = np.clip(a, -1.0, 1.0)
            out_act[t] = a
            obs, reward, terminated, truncated, info = env.step(a)
            out_rew[t] = reward
            out_succ[t] = bool(info.get("success", 0.0))
            if terminated or truncated:
                T = t + 1
                break
        out_done[T - 1] = True
        return dict(observations=out_obs[:T], actions=out_act[:T], rewards=out_rew[:T], dones=out_done[:T],
                    success=out_succ[:T], goal_index=g, final_observation=obs.astype(np.float32))


_RUNNERS: dict[str, _TaskRunner] = {}


def _runner(task: str) -> _TaskRunner:
    if task not in _RUNNERS:
        _RUNNERS[task] = _TaskRunner(task)
    return _RUNNERS[task]


def _save_npz_atomic(path: str, arrays: dict) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _collect_chunk(job: dict) -> dict:
    """Runs episodes [lo, hi) of one task and writes them as one chunk file (worker side)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    task, lo, hi = job["task"], job["lo"], job["hi"]
    runner = _runner(task)
    t0 = time.perf_counter()
    eps = []
    for i in range(lo, hi):
        p = expert_probability(job["quality"], i, job["episodes"])
        eps.append(runner.run(p, episode_rng(job["seed"], task, i), job["episode_steps"]))
        eps[-1]["expert_prob"] = p
    seconds = time.perf_counter() - t0
    lengths = np.array([len(e["rewards"]) for e in eps], np.int64)
    arrays = {f: np.concatenate([e[f] for e in eps]) for f in STEP_FIELDS}
    arrays["lengths"] = lengths
    arrays["goal_index"] = np.array([e["goal_index"] for e in eps], np.int32)
    arrays["expert_prob"] = np.array([e["expert_prob"] for e in eps], np.float32)
    arrays["final_observations"] = np.stack([e["final_observation"] for e in eps])
    _save_npz_atomic(os.path.join(job["folder"], f"{lo:06d}-{hi:06d}.npz"), arrays)
    return {"task": task, "episodes": hi - lo, "steps": int(lengths.sum()), "seconds": seconds}


def _params(tasks, quality, episodes, seed, episode_steps) -> dict:
    return {"tasks": list(tasks), "quality": quality, "episodes_per_task": int(episodes), "seed": int(seed),
            "episode_steps": int(episode_steps), "expert_noise": EXPERT_NOISE}


def _done_ranges(folder: str) -> list[tuple[int, int]]:
    if not os.path.isdir(folder):
        return []
    ranges = []
    for f in os.listdir(folder):
        m = _CHUNK_RE.fullmatch(f)
        if m:
            ranges.append((int(m.group(1)), int(m.group(2))))
    return sorted(ranges)


def _missing(ranges, episodes: int) -> list[tuple[int, int]]:
    covered = np.zeros(episodes, bool)
    for lo, hi in ranges:
        covered[lo:hi] = True
    missing, i = [], 0
    while i < episodes:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < episodes and not covered[j]:
            j += 1
        missing.append((i, j))
        i = j
    return missing


def _merge_task(out: str, task: str, partial: str, episodes: int) -> tuple[dict, dict]:
    """Chunk files -> the task's .npy files (written through memory maps, never whole in memory)."""
    folder = os.path.join(partial, task)
    chunks = _done_ranges(folder)
    expect = 0
    for lo, hi in chunks:
        if lo != expect:
            raise DatasetError(f"{folder}: chunk files overlap or leave a gap at episode {expect}")
        expect = hi
    if expect != episodes:
        raise DatasetError(f"{folder}: chunks cover {expect} of {episodes} episodes")
    loaded = []
    for lo, hi in chunks:
        name = os.path.join(folder, f"{lo:06d}-{hi:06d}.npz")
        try:
            loaded.append(np.load(name))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{name}: unreadable chunk ({exc}); delete it and collect again to redo it") from exc
    lengths = np.concatenate([z["lengths"] for z in loaded])
    N = int(lengths.sum())
    dest = os.path.join(out, task)
    os.makedirs(dest, exist_ok=True)
    small = {
        "episode_starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "goal_index": np.concatenate([z["goal_index"] for z in loaded]).astype(np.int32),
        "expert_prob": np.concatenate([z["expert_prob"] for z in loaded]).astype(np.float32),
    }
    if all("final_observations" in z.files for z in loaded):  # chunks of older versions lack it
        # the observation after each episode's last action (Minari episodes hold it)
        small["final_observations"] = np.concatenate([z["final_observations"] for z in loaded]).astype(np.float32)
    specs = {"observations": ((N, STATE_DIM), np.float32), "actions": ((N, ACT_DIM), np.float32),
             "rewards": ((N,), np.float32), "dones": ((N,), bool), "success": ((N,), bool)}
    files = {}
    for field, (shape, dtype) in specs.items():
        final = os.path.join(dest, f"{field}.npy")
        tmp = final + ".tmp"
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        pos = 0
        for z in loaded:
            block = z[field]
            mm[pos : pos + len(block)] = block
            pos += len(block)
        mm.flush()
        del mm
        os.replace(tmp, final)
        files[f"{task}/{field}.npy"] = final
    for field, arr in small.items():
        final = os.path.join(dest, f"{field}.npy")
        np.save(final + ".tmp.npy", arr)
        os.replace(final + ".tmp.npy", final)
        files[f"{task}/{field}.npy"] = final
    for z in loaded:
        z.close()
    entries = {}
    for rel, full in files.items():
        arr = np.load(full, mmap_mode="r")
        entries[rel] = {"sha256": file_sha256(full), "bytes": os.path.getsize(full), "shape": list(arr.shape),
                        "dtype": str(arr.dtype)}
        del arr
    rew = np.load(os.path.join(dest, "rewards.npy"), mmap_mode="r")
    succ = np.load(os.path.join(dest, "success.npy"), mmap_mode="r")
    starts = small["episode_starts"]
    sums = np.concatenate([[0.0], np.cumsum(rew, dtype=np.float64)])
    returns = sums[starts[1:]] - sums[starts[:-1]]
    hits = np.concatenate([[0], np.cumsum(succ, dtype=np.int64)])
    ever = (hits[starts[1:]] - hits[starts[:-1]]) > 0
    stats = {"episodes": int(len(lengths)), "transitions": N, "mean_return": float(returns.mean()),
             "success_rate": float(ever.mean())}
    return entries, stats


def _metaworld_version() -> str:
    try:
        from importlib.metadata import version

        return version("metaworld")
    except Exception:  # pragma: no cover
        return "unknown"


def format_table(stats: dict) -> str:
    rows = [f"{'task':32s} {'episodes':>8s} {'mean return':>12s} {'success':>8s}"]
    for task, s in stats.items():
        rows.append(f"{task:32s} {s['episodes']:8d} {s['mean_return']:12.1f} {100 * s['success_rate']:7.1f}%")
    if stats:
        mean_sr = float(np.mean([s["success_rate"] for s in stats.values()]))
        rows.append(f"{'mean over tasks':32s} {'':8s} {'':12s} {100 * mean_sr:7.1f}%")
    return "\n".join(rows)


def collect(tasks, out, episodes_per_task: int, quality: str = "near-optimal", seed: int = 0,
            workers: int | None = None, episode_steps: int = 500, chunk_episodes: int | None = None,
            progress: bool = True, verbose: bool = True, format: str = "harmodt_fast",
            minari_id: str = "harmodt_fast/{task}-v0"):
    """Collects a dataset folder from Meta-World's scripted experts (rule: this module's docstring) and returns
    its path; with format="minari" it also writes every task as the Minari dataset `minari_id.format(task=...)`
    (under MINARI_DATASETS_PATH) and returns {task: "minari:<id>"}, which hf.load_dataset reads.

    tasks: a task-set name ("MT5"), a comma-separated string or a list of v3 names.
    episode_steps: steps per episode (the env's limit is 500; fewer gives short episodes, e.g. for tests).
    workers: processes (spawn context); None = the CPUs available; 0 or 1 runs in this process. As with any spawned
        pool, a script that calls collect with workers > 1 needs the `if __name__ == "__main__":` guard.
    chunk_episodes: episodes per work item (and per resumable chunk file); None picks a size from the work.
    Resumable: finished chunks are kept in `out/.partial/` and a second call with the same arguments collects only
    what is missing; a finished folder is returned as it is. Different arguments for an existing folder are a
    ValueError. Every argument is checked before anything is written; the folder is held by one collection at a
    time (a second one at once is a DatasetError naming the holder).
    """
    if format not in ("harmodt_fast", "minari"):
        raise ValueError(f"unknown format {format!r}; expected 'harmodt_fast' or 'minari'")
    if format == "minari":
        from harmodt_fast.data.minari_data import check_dataset_id, export_minari

        check_dataset_id(minari_id)
        folder = collect(tasks, out, episodes_per_task, quality, seed, workers, episode_steps, chunk_episodes,
                         progress, verbose)
        return export_minari(folder, minari_id)
    tasks = resolve_tasks(tasks)
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}; expected one of {QUALITIES}")
    from harmodt_fast.envs import MAX_EPISODE_STEPS

    E = integer_in("episodes_per_task", episodes_per_task, 1)
    seed = integer_in("seed", seed, 0)  # numpy seeds are non-negative
    episode_steps = integer_in("episode_steps", episode_steps, 1, MAX_EPISODE_STEPS)
    if chunk_episodes is not None:
        chunk_episodes = integer_in("chunk_episodes", chunk_episodes, 1)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, integer_in("workers", workers, 0))
    out = os.path.abspath(os.fspath(out))
    with folder_lock(out, DatasetError):
        return _collect_locked(tasks, out, E, quality, seed, workers, episode_steps, chunk_episodes, progress,
                               verbose)


def _collect_locked(tasks, out, E, quality, seed, workers, episode_steps, chunk_episodes, progress, verbose) -> str:
    params = _params(tasks, quality, E, seed, episode_steps)
    if os.path.exists(os.path.join(out, MANIFEST)):
        manifest = read_manifest(out)
        old = {k: manifest.get(k) for k in params}
        if old != params:
            diff = sorted(k for k in params if old[k] != params[k])
            raise ValueError(f"{out} already holds a finished dataset collected with different {diff}; "
                             f"choose another folder")
        if verbose:
            print(format_table(manifest["stats"]))
        return out

    partial = os.path.join(out, PARTIAL)
    os.makedirs(partial, exist_ok=True)
    ppath = os.path.join(partial, "params.json")
    if os.path.exists(ppath):
        with open(ppath) as f:
            old = json.load(f)
        if old != params:
            diff = sorted(k for k in params if old.get(k) != params[k])
            raise ValueError(f"{out} holds an unfinished collection with different {diff}; resume it with the "
                             f"same arguments or choose another folder")
    else:
        with open(ppath + ".tmp", "w") as f:
            json.dump(params, f, indent=1)
        os.replace(ppath + ".tmp", ppath)

    if chunk_episodes is None:
        # at most ~50 chunk files per task; otherwise small enough to keep every worker busy to the end
        chunk_episodes = max(math.ceil(E / 50), min(20, math.ceil(E * len(tasks) / (4 * workers))))
    jobs = []
    for task in tasks:
        folder = os.path.join(partial, task)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):  # left by a worker killed while writing
            if f.startswith(".tmp-"):
                os.unlink(os.path.join(folder, f))
        for lo, hi in _missing(_done_ranges(folder), E):
            for a in range(lo, hi, chunk_episodes):
                jobs.append(dict(task=task, lo=a, hi=min(hi, a + chunk_episodes), quality=quality, episodes=E,
                                 seed=seed, episode_steps=episode_steps, folder=folder))
    total = E * len(tasks)
    done = total - sum(j["hi"] - j["lo"] for j in jobs)
    steps = seconds = 0.0
    bar = progress_bar(total, "collect", progress, initial=done, unit="ep")
    try:
        if jobs and (workers == 1 or len(jobs) == 1):
            for job in jobs:
                r = _collect_chunk(job)
                steps, seconds = steps + r["steps"], seconds + r["seconds"]
                bar.update(r["episodes"])
        elif jobs:
            import multiprocessing as mp

            # MuJoCo and fork do not mix reliably; spawn starts clean interpreters
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for r in pool.imap_unordered(_collect_chunk, jobs):
                    steps, seconds = steps + r["steps"], seconds + r["seconds"]
                    bar.update(r["episodes"])
    finally:
        bar.close()

    files, stats = {}, {}
    for task in tasks:
        entries, stats[task] = _merge_task(out, task, partial, E)
        files.update(entries)
    manifest = {
        "format": FORMAT,
        **params,
        "rule": "p_i = 1 (expert), i/(E-1) (near-optimal), i/(2E-1) (sub-optimal); per step: expert action + "
                "N(0, expert_noise^2) with probability p_i, else uniform [-1,1]^4; clipped to [-1,1]; goal "
                "variant uniform over the task's 50; rng seeded by (seed, crc32(task), i)",
        "counts": {t: {"episodes": s["episodes"], "transitions": s["transitions"]} for t, s in stats.items()},
        "stats": stats,
        "metaworld_version": _metaworld_version(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "collection_env_steps_per_s_per_worker": (steps / seconds) if seconds else None,
        "files": files,
    }
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, MANIFEST))
    shutil.rmtree(partial, ignore_errors=True)
    if verbose:
        print(format_table(stats))
        if seconds:
            print(f"collected {int(steps)} env steps at {steps / seconds:.0f} steps/s per worker")
    return out
