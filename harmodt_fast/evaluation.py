"""Evaluation in Meta-World: every task's rollouts batched through one model call per environment step.

Protocol (the HarmoDT paper's): for every task, `episodes` rollouts on goal variants 0..episodes-1 of the task's
Meta-World MT1 variant list, at most 500 steps each (the environment truncates there); an episode succeeds if
info["success"] is ever true. Per task: success rate, mean return, mean length; over tasks: the mean success.
Every task acts through its own mask and its own prompt; the return-to-go target is configurable (published: 4500,
scale 1000, both from the checkpoint's config unless overridden).

How it runs (read top to bottom: API, checkpoint, environments, rollout loop, the scripted oracle, report):
- Environments: the episodes' environments are dealt in equal contiguous shares (task-major) into one group per
  worker; a group (EnvGroup) is one gymnasium environment holding several Meta-World environments, and gymnasium's
  AsyncVectorEnv steps the groups in worker processes (observations come back through shared memory). Contiguous
  shares keep each worker to a few tasks, so it sets up few Meta-World benchmarks (about 0.4 s per task). Groups
  build their Meta-World environments on the first reset, inside the worker, while the model loads. A task
  without a Meta-World name (trained on a Minari dataset) runs in the gymnasium environment its dataset recorded.
- The model: hf.load_policy's Policy (harmodt_fast/policy.py), one row per live episode, asked once per step for
  every live episode's action (one forward of the mixed-task masked model); unseen tasks (`unseen=True`) go
  through the consensus mask, as described there.
- Determinism: a Meta-World environment with a fixed goal variant resets to the same state, and the model runs in
  eval mode, so a seed gives the same report on every run, whatever the number of workers or `max_envs`.
- Memory: a Meta-World environment takes about 20 MB; `max_envs` caps how many are open at once (episodes then run
  in waves, every wave still holding every task).
- Videos (`video=N`): the groups render and write them (harmodt_fast/video.py), in the process that steps the
  environment, so no frame crosses a process and the rollout (seeds, actions, numbers) is the same as without.
"""
from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import time

import numpy as np
import torch

from harmodt_fast._io import atomic_write
from harmodt_fast.checkpoint import CheckpointError, RunState, read_run
from harmodt_fast.envs import MAX_EPISODE_STEPS, goal_variants, make_env, scripted_policy
from harmodt_fast.policy import policy_from_checkpoint, task_order
from harmodt_fast.runtime import integer_in, pick_device, progress_bar
from harmodt_fast.video import EpisodeRecorder, default_video_folder, use_gl_backend, video_spec

try:
    import gymnasium as gym
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "evaluation needs gymnasium and Meta-World: pip install 'harmodt_fast[metaworld]'"
    ) from exc

OBS_DIM, ACT_DIM = 39, 4


# ---- the API -------------------------------------------------------------------------------------------------------
def evaluate(checkpoint_or_result, tasks=None, episodes: int = 10, seed: int = 0, *,
             target_return: float | None = None, max_episode_steps: int = MAX_EPISODE_STEPS,
             unseen: bool = False, merge_threshold: int | None = None, device: str = "auto",
             precision: str | None = None, backend: str | None = None, workers: int | None = None,
             max_envs: int | None = None, progress: bool = False, model=None, video: int = 0,
             video_dir=None, video_format: str = "mp4") -> dict:
    """Rolls out a trained model in Meta-World by the paper's protocol and returns the report (a JSON-able dict).

    checkpoint_or_result: a checkpoint file, a run folder holding checkpoint.pt, an export folder (hf.export), an
        object with a `.checkpoint` path (what hf.train returns), a loaded checkpoint dict or a RunState.
    tasks: None (the checkpoint's tasks), a task-set name ("MT10"), a comma-separated string or a list of names.
        A task the checkpoint was not trained on is an error unless `unseen=True`: then it is evaluated with the
        consensus mask of `merge_threshold` (default: the checkpoint config's, which defaults to half the trained
        tasks).
    episodes: rollouts per task, on goal variants 0..episodes-1; seed: the Meta-World MT1 seed that draws the
        goal-variant list (0: Meta-World's default list, the one hf.collect uses).
    target_return: the return-to-go the model is conditioned on (default: by config.target_mode, published 4500).
    max_episode_steps: at most 500 (Meta-World truncates there); smaller only for quick checks.
    device: "auto" | "cpu" | "cuda"...; precision: None (the checkpoint config's), "auto", "fp32" or "bf16";
    backend: the backend of every masked op (linear, fused MLP, fused attention): "auto", "triton", "cpp" or
        "torch" (None: the checkpoint config's, "auto" unless it was trained with another).
    workers: environment worker processes (None: one per CPU, at most one per environment; 0: in this process).
    max_envs: at most this many environments open at once (at least one per task); None: all episodes at once.
    model: roll out this model, which holds the run's weights (the trainer's live one), instead of building one; it
        runs on its own device (`device` is ignored), in eval mode, and is left in the mode it had.
    video: record the first `video` episodes of every task (0..episodes), one file per episode,
        `<task>_episode<e>.<video_format>` ("mp4" or "gif") in `video_dir` (default: RUN/plots/videos of a run folder
        or checkpoint path), rendered offscreen (MUJOCO_GL: see harmodt_fast/video.py); report["videos"] lists them.

    The report has "mean_success", "per_task" {task: {"success_rate", "mean_return", "mean_length", "successes",
    "returns", "lengths", "seen"}}, "episodes", "env_steps", "env_steps_per_s" (over the rollout loop),
    "model_time_share" (model time / wall time of the call), the timings, the device, precision and backend that ran.
    """
    wall0 = time.perf_counter()
    _check_counts(episodes, max_episode_steps, seed=seed, workers=workers, max_envs=max_envs,
                  merge_threshold=merge_threshold)  # before anything is read
    spec = None
    if integer_in("video", video, 0, episodes):
        spec = video_spec(video, default_video_folder(checkpoint_or_result) if video_dir is None else video_dir,
                          video_format)
    dev = pick_device(device) if model is None else next(model.parameters()).device  # so is an unknown device
    state, source = _load(checkpoint_or_result)
    trained = list(state.tasks)
    requested, order, new, threshold = task_order(state, tasks, unseen, merge_threshold, source)
    torch.manual_seed(seed)
    from harmodt_fast.ops._dispatch import check_backend

    check_backend(state.config.get("backend", "auto") if backend is None else backend, dev)  # before any env starts

    def make_policy():  # runs while the workers build their environments
        return policy_from_checkpoint(state, order, dev, new=new, threshold=threshold, target_return=target_return,
                                      precision=precision, backend=backend, seed=seed, model=model)

    envs = [_environment(t, state, source) for t in order]
    if spec is not None and any(isinstance(e, tuple) for e in envs):
        raise ValueError(f"{source}: videos are recorded in Meta-World environments only; task(s) "
                         f"{[t for t, e in zip(order, envs) if isinstance(e, tuple)]} run in a recorded gymnasium "
                         f"environment: evaluate them without video")
    was_training = model is not None and model.training
    try:
        stats = rollout(order, episodes, make_policy, seed=seed, max_episode_steps=max_episode_steps,
                        workers=workers, max_envs=max_envs, progress=progress, envs=envs, video=spec)
    finally:
        if model is not None:
            model.train(was_training)
    policy = stats.pop("policy")
    wall = time.perf_counter() - wall0

    report = summarise(stats, requested)
    for t in requested:
        report["per_task"][t]["seen"] = t in trained
    masked_backend = None
    if policy.model.task_masks() is not None:
        from harmodt_fast import ops

        masked_backend = ops.last_backend("masked_linear")
    report.update({
        "checkpoint": source, "step": state.step, "method": policy.config.method,
        "unseen_tasks": new, "merge_threshold": threshold,
        "target_return": policy.target_return, "rtg_scale": policy.config.rtg_scale,
        "device": str(dev), "precision": "bf16" if policy.amp_dtype == torch.bfloat16 else "fp32",
        "masked_linear_backend": masked_backend,
        "wall_s": wall, "model_time_share": stats["model_s"] / wall,
    })
    if spec is not None:
        report["videos"] = {t: [spec.path(t, e) for e in range(spec.episodes)] for t in requested}
    if new:
        seen_rates = [report["per_task"][t]["success_rate"] for t in requested if t in trained]
        report["mean_success_seen"] = float(np.mean(seen_rates)) if seen_rates else None
        report["mean_success_unseen"] = float(np.mean([report["per_task"][t]["success_rate"] for t in new]))
    return report


# ---- the checkpoint ------------------------------------------------------------------------------------------------
def _load(source) -> tuple[RunState, str]:
    """(RunState, a name for messages), checked (checkpoint.read_run), for Meta-World's dimensions."""
    state, name = read_run(source)
    cfg = state.config
    if (cfg.get("state_dim"), cfg.get("act_dim")) != (OBS_DIM, ACT_DIM):
        raise CheckpointError(f"{name}: inconsistent checkpoint: state/action dims {cfg.get('state_dim')}/"
                              f"{cfg.get('act_dim')} are not Meta-World's {OBS_DIM}/{ACT_DIM}")
    return state, name


def _environment(task: str, state: RunState, name: str):
    """What EnvGroup builds for a task: its Meta-World name, or ("spec", EnvSpec JSON) of the environment a Minari
    dataset recorded for it (a Meta-World one of ours is used by its task name, with the usual goal variants)."""
    from harmodt_fast.tasks import TASK_SETS

    if task in TASK_SETS["MT50"]:
        return task
    spec_json = state.task_envs.get(task)
    if spec_json is None:
        raise ValueError(f"{name}: task {task!r} has no environment: it is not a Meta-World task name and the "
                         f"checkpoint holds no environment for it (only Minari datasets that record one give it)")
    from harmodt_fast.data.minari_data import ENTRY_POINT

    spec = gym.envs.registration.EnvSpec.from_json(spec_json)
    if spec.entry_point == ENTRY_POINT and spec.kwargs.get("task") in TASK_SETS["MT50"]:
        return spec.kwargs["task"]
    return ("spec", spec_json)


def _check_counts(episodes: int, max_episode_steps: int, **optional) -> None:
    """ValueError naming an argument that is not an integer in its range (optional ones: seed >= 0, workers >= 0,
    max_envs >= 1, merge_threshold >= 1, each may be None)."""
    for name, value in optional.items():
        if value is not None:
            integer_in(name, value, 1 if name in ("max_envs", "merge_threshold") else 0)
    integer_in("episodes", episodes, 1, 50)  # Meta-World has 50 goal variants
    integer_in("max_episode_steps", max_episode_steps, 1, MAX_EPISODE_STEPS)


# ---- environments: groups of Meta-World environments, stepped by gymnasium's vector env ----------------------------
class EnvGroup(gym.Env):
    """Several Meta-World environments as one gymnasium environment (one worker process's share of the episodes).

    slots: one (task, goal_indices) per environment: goal_indices[w] is the goal variant of its episode in wave w
    (None: no episode in that wave); padding slots are (None, ()). task: a Meta-World name, or ("spec", EnvSpec
    JSON) for another gymnasium environment (goal variant g: reset seed g). Observation [n, 39], action [n, 4].
    reset(options={"wave": w}) starts wave w; step() steps the slots whose episode is running and reports per slot
    in info: "reward", "success" and "done". The group itself never terminates, so the vector env never resets it
    behind our back. video: a VideoSpec: its episodes (goal variants below video.episodes) are recorded here.
    """

    metadata = {"render_modes": []}

    def __init__(self, slots, max_episode_steps: int = MAX_EPISODE_STEPS, seed: int = 0, video=None):
        self.slots = [(task, tuple(goals)) for task, goals in slots]
        self.max_episode_steps, self.seed = int(max_episode_steps), int(seed)
        self.video, self._recorders = video, {}  # slot -> the EpisodeRecorder of its running episode
        if video is not None:
            use_gl_backend(video.gl)  # before this process makes its first rendering environment
        n = len(self.slots)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n, OBS_DIM), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (n, ACT_DIM), np.float32)
        self._envs = [None] * n  # built on the first reset, inside the worker
        self._running = np.zeros(n, dtype=bool)
        self._steps = np.zeros(n, dtype=np.int64)
        self._obs = np.zeros((n, OBS_DIM), dtype=np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        wave = int((options or {}).get("wave", 0))
        self._drop_recorders()
        for i, (task, goals) in enumerate(self.slots):
            goal = goals[wave] if task is not None and wave < len(goals) else None
            self._running[i], self._steps[i] = goal is not None, 0
            if goal is None:
                self._obs[i] = 0.0
                continue
            if isinstance(task, tuple):  # a recorded gymnasium environment: goal variant g is reset seed g
                if self._envs[i] is None:
                    self._envs[i] = gym.make(gym.envs.registration.EnvSpec.from_json(task[1]))
                self._obs[i] = self._envs[i].reset(seed=goal)[0]
                continue
            if self._envs[i] is None:
                self._envs[i] = make_env(task, goal, self.seed, render_size=self.video.size if self.video else None)
            else:  # same task, next goal variant: no new MuJoCo model
                self._envs[i].set_task(goal_variants(task, self.seed)[goal])
            self._obs[i] = self._envs[i].reset()[0]
            if self.video is not None and goal < self.video.episodes:
                self._recorders[i] = EpisodeRecorder(self.video, task, goal, self.max_episode_steps)
                self._recorders[i].record(self._envs[i])
        return self._obs.copy(), {"running": self._running.copy()}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(len(self.slots), ACT_DIM), -1.0, 1.0)
        n = len(self.slots)
        reward, success, done = np.zeros(n), np.zeros(n, dtype=bool), ~self._running
        for i in np.flatnonzero(self._running):
            obs, r, terminated, truncated, info = self._envs[i].step(action[i])
            self._obs[i], reward[i], success[i] = obs, r, bool(info.get("success", False))
            self._steps[i] += 1
            if terminated or truncated or self._steps[i] >= self.max_episode_steps:
                self._running[i], done[i] = False, True
            if i in self._recorders:
                self._recorders[i].record(self._envs[i], r, success[i])
                if done[i]:
                    self._recorders.pop(i).finish()
        return self._obs.copy(), float(reward.sum()), False, False, {"reward": reward, "success": success, "done": done}

    def _drop_recorders(self):
        for recorder in self._recorders.values():  # episodes cut off (the evaluation stopped): no file
            recorder.abort()
        self._recorders = {}

    def close(self):
        self._drop_recorders()
        for env in self._envs:
            if env is not None:
                env.close()
        self._envs = [None] * len(self.slots)


def _plan(num_tasks: int, episodes: int, workers: int, max_envs: int | None):
    """Deals the episodes to environment slots and groups.

    Returns (groups, rows, waves): groups[g] = the slots of worker g as (task position, goal indices per wave);
    rows[w] = wave w's rows in task order, each (task position, episode, flat slot index g * n + i).
    """
    per_task = episodes if max_envs is None else max(1, min(episodes, int(max_envs) // num_tasks))
    waves = math.ceil(episodes / per_task)
    slots = [(t, j) for t in range(num_tasks) for j in range(per_task)]  # task-major
    workers = max(1, min(workers, len(slots)))
    n = math.ceil(len(slots) / workers)
    workers = math.ceil(len(slots) / n)
    groups = [[(None, ())] * n for _ in range(workers)]
    flat_index = {}
    for k, (t, j) in enumerate(slots):  # contiguous: a worker sets up MT1 for few tasks (~0.4 s each)
        g, i = k // n, k % n
        goals = tuple(w * per_task + j if w * per_task + j < episodes else None for w in range(waves))
        groups[g][i] = (t, goals)
        flat_index[t, j] = g * n + i
    rows = [[(t, w * per_task + j, flat_index[t, j]) for t in range(num_tasks) for j in range(per_task)
             if w * per_task + j < episodes] for w in range(waves)]
    return groups, rows, waves


def make_vector_env(tasks, groups, max_episode_steps: int, seed: int, workers: int, video=None):
    """gymnasium AsyncVectorEnv over the groups (worker processes), or SyncVectorEnv when workers == 0."""
    fns = [functools.partial(EnvGroup, [(tasks[t] if t is not None else None, goals) for t, goals in group],
                             max_episode_steps, seed, video) for group in groups]
    if workers == 0:
        return gym.vector.SyncVectorEnv(fns)
    # MuJoCo and OpenMP-using parents do not survive fork reliably: start workers from a clean process.
    methods = multiprocessing.get_all_start_methods()
    return gym.vector.AsyncVectorEnv(fns, shared_memory=True, context="forkserver" if "forkserver" in methods
                                     else "spawn", daemon=True)


# ---- the rollout loop ----------------------------------------------------------------------------------------------
def rollout(tasks, episodes: int, policy, *, seed: int = 0, max_episode_steps: int = MAX_EPISODE_STEPS,
            workers: int | None = None, max_envs: int | None = None, progress: bool = False, envs=None,
            video=None) -> dict:
    """Runs `episodes` episodes of every task (goal variants 0..episodes-1) with `policy`; all tasks' environments
    step together and the policy is asked once per step for the actions of every live episode.

    policy: a Policy (harmodt_fast/policy.py) or anything with its interface: .reset(row_task_names) at the start
    of a wave (rows in task order); .act(obs [R, 39] float64, live bool [R]) -> actions [R, 4] (rows not live are
    ignored); .observe(rewards [R]) after every step (0 for rows not live). Or a function that returns such a policy: it is called while
    the workers build their environments, so loading a model overlaps with that.
    envs: what each task's environments are built from (EnvGroup's slot tasks; None: the task names).
    video: a VideoSpec (harmodt_fast/video.py): the groups record those episodes; None: no video.
    Returns per-episode arrays [T, E] ("success", "returns", "lengths"), counters, timings and the policy.
    """
    tasks = list(tasks)
    _check_counts(episodes, max_episode_steps, seed=seed, workers=workers, max_envs=max_envs)
    T = len(tasks)
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    groups, wave_rows, waves = _plan(T, episodes, max(workers, 1), max_envs)
    success = np.zeros((T, episodes), dtype=bool)
    returns = np.zeros((T, episodes))
    lengths = np.zeros((T, episodes), dtype=np.int64)
    model_s = env_s = 0.0
    forwards = max_rows = 0

    t0 = time.perf_counter()
    vec = make_vector_env(tasks if envs is None else list(envs), groups, max_episode_steps, seed, workers, video)
    try:
        if workers and not hasattr(policy, "act"):
            vec.reset_async(seed=seed, options={"wave": 0})  # the workers build every environment meanwhile
            policy = policy()
            obs, _ = vec.reset_wait()
        else:
            obs, _ = vec.reset(seed=seed, options={"wave": 0})
            policy = policy if hasattr(policy, "act") else policy()
        setup_s = time.perf_counter() - t0
        bar = progress_bar(waves * max_episode_steps, "evaluate", progress)
        for w, rows in enumerate(wave_rows):
            if w > 0:
                obs, _ = vec.reset(seed=seed, options={"wave": w})
            row_task = np.array([t for t, _, _ in rows])
            row_ep = np.array([e for _, e, _ in rows])
            slot = np.array([s for _, _, s in rows])
            live = np.ones(len(rows), dtype=bool)
            policy.reset([tasks[t] for t in row_task])
            for _ in range(max_episode_steps):
                flat_obs = obs.reshape(-1, OBS_DIM)[slot]
                t1 = time.perf_counter()
                actions = policy.act(flat_obs, live)
                t2 = time.perf_counter()
                forwards, max_rows = forwards + 1, max(max_rows, int(live.sum()))
                slot_actions = np.zeros((obs.shape[0] * obs.shape[1], ACT_DIM), dtype=np.float32)
                slot_actions[slot[live]] = actions[live]
                obs, _, _, _, info = vec.step(slot_actions.reshape(obs.shape[0], obs.shape[1], ACT_DIM))
                t3 = time.perf_counter()
                model_s, env_s = model_s + (t2 - t1), env_s + (t3 - t2)
                reward = np.where(live, info["reward"].reshape(-1)[slot], 0.0)
                returns[row_task, row_ep] += reward
                success[row_task, row_ep] |= live & info["success"].reshape(-1)[slot]
                lengths[row_task, row_ep] += live
                policy.observe(reward)
                live &= ~info["done"].reshape(-1)[slot]
                bar.update(1)
                if not live.any():
                    break
        bar.close()
    finally:
        vec.close()
    rollout_s = time.perf_counter() - t0 - setup_s
    env_steps = int(lengths.sum())
    return {"tasks": tasks, "episodes": episodes, "success": success, "returns": returns, "lengths": lengths,
            "env_steps": env_steps, "env_steps_per_s": env_steps / max(rollout_s, 1e-9), "setup_s": setup_s,
            "rollout_s": rollout_s, "model_s": model_s, "env_s": env_s, "model_calls": forwards,
            "max_rows_per_call": max_rows, "waves": waves, "workers": len(groups) if workers else 0, "seed": seed,
            "max_episode_steps": max_episode_steps, "policy": policy}


# ---- policies ------------------------------------------------------------------------------------------------------
class ScriptedPolicy:
    """Meta-World's scripted experts behind the Policy interface: the oracle that checks the rollout machinery."""

    def __init__(self, tasks):
        self.experts = {t: scripted_policy(t) for t in tasks}

    def reset(self, tasks) -> None:
        self.row_experts = [self.experts[t] for t in tasks]

    def act(self, obs: np.ndarray, live: np.ndarray) -> np.ndarray:
        out = np.zeros((obs.shape[0], ACT_DIM), dtype=np.float32)
        for r in np.flatnonzero(live):
            out[r] = np.clip(self.row_experts[r].get_action(obs[r]), -1.0, 1.0)
        return out

    def observe(self, rewards) -> None:
        pass


# ---- the report ----------------------------------------------------------------------------------------------------
def summarise(stats: dict, order=None) -> dict:
    """The JSON-able report of a rollout: per task and mean over tasks (tasks listed in `order`)."""
    tasks = list(stats["tasks"])
    per_task = {}
    for task in order or tasks:
        i = tasks.index(task)
        s, r, n = stats["success"][i], stats["returns"][i], stats["lengths"][i]
        per_task[task] = {"success_rate": float(s.mean()), "mean_return": float(r.mean()),
                          "mean_length": float(n.mean()), "successes": s.astype(int).tolist(),
                          "returns": [float(v) for v in r], "lengths": n.tolist()}
    report = {"mean_success": float(np.mean([v["success_rate"] for v in per_task.values()])),
              "tasks": list(per_task), "per_task": per_task}
    for key in ("episodes", "seed", "max_episode_steps", "env_steps", "env_steps_per_s", "setup_s", "rollout_s",
                "model_s", "env_s", "model_calls", "max_rows_per_call", "waves", "workers"):
        report[key] = stats[key]
    report["model_share_of_rollout"] = stats["model_s"] / max(stats["rollout_s"], 1e-9)
    return report


def format_table(report: dict) -> str:
    """The per-task table the CLI prints."""
    width = max(len("task"), *(len(t) for t in report["per_task"]))
    lines = [f"{'task':<{width}}  {'success':>7}  {'return':>9}  {'length':>7}"]
    for task, r in report["per_task"].items():
        mark = "" if r.get("seen", True) else "  (unseen: consensus mask)"
        lines.append(f"{task:<{width}}  {r['success_rate']:>7.2f}  {r['mean_return']:>9.1f}  "
                     f"{r['mean_length']:>7.1f}{mark}")
    lines.append(f"{'mean over ' + str(len(report['per_task'])) + ' tasks':<{width}}  {report['mean_success']:>7.2f}")
    lines.append(
        f"{report['episodes']} episodes per task, {report['env_steps']} env steps in {report['rollout_s']:.1f} s "
        f"({report['env_steps_per_s']:.0f} steps/s; setup {report['setup_s']:.1f} s); model "
        f"{100 * report.get('model_time_share', 0.0):.0f}% of {report.get('wall_s', 0.0):.1f} s wall, "
        f"{report['model_calls']} batched calls of up to {report['max_rows_per_call']} rows; "
        f"{report.get('device', '?')} {report.get('precision', '')}, masked_linear backend "
        f"{report.get('masked_linear_backend')}")
    return "\n".join(lines)


def save_report(report: dict, path: str) -> str:
    """Writes the report as JSON (via a temporary file, so a reader never sees half a report)."""
    return atomic_write(path, lambda f: json.dump(report, f, indent=1), binary=False)
