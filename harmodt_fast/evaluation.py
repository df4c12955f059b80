"""Evaluation in Meta-World: every task's rollouts batched through one model call per environment step.

Protocol (the HarmoDT paper's): for every task, `episodes` rollouts on goal variants 0..episodes-1 of the task's
Meta-World MT1 variant list, at most 500 steps each (the environment truncates there); an episode succeeds if
info["success"] is ever true. Per task: success rate, mean return, mean length; over tasks: the mean success.
Every task acts through its own mask and its own prompt; the return-to-go target is configurable (published: 4500,
scale 1000, both from the checkpoint's config unless overridden).

How it runs (read top to bottom: API, checkpoint and tasks, environments, rollout loop, policies, report):
- Environments: the episodes' environments are dealt in equal contiguous shares (task-major) into one group per
  worker; a group (EnvGroup) is one gymnasium environment holding several Meta-World environments, and gymnasium's
  AsyncVectorEnv steps the groups in worker processes (observations come back through shared memory). Contiguous
  shares keep each worker to a few tasks, so it sets up few Meta-World benchmarks (about 0.4 s per task). Groups
  build their Meta-World environments on the first reset, inside the worker, while the model loads.
- The model: one row per live episode, rows ordered by model task id, so the batch's task segments are contiguous
  and ONE forward of the mixed-task masked model gives every episode's action. The context window (the last K steps
  of states, actions, returns-to-go, timesteps and the padding mask) lives in preallocated [rows, 2K, ...] tensors
  on the model's device: a step writes one column and the model reads a [rows, K] view of them; every K steps the
  last K-1 columns move to the front (one copy per K steps instead of a shift per step). No per-task model copies:
  the masks stay packed inside the one model.
- Unseen tasks (not in the checkpoint; `unseen=True`): the consensus mask (a weight is kept if at least
  `merge_threshold` trained tasks keep it) is appended to the model's masks as one extra task id, whose segment
  holds every unseen task's rows. An unseen task's prompt is the last prompt_len steps of one scripted-expert
  episode on its last goal variant (the training prompts are the last steps of a task's best episode), and its
  states are normalised with the mean of the trained tasks' statistics.
- Determinism: a Meta-World environment with a fixed goal variant resets to the same state, and the model runs in
  eval mode, so a seed gives the same report on every run, whatever the number of workers or `max_envs`.
- Memory: a Meta-World environment takes about 20 MB; `max_envs` caps how many are open at once (episodes then run
  in waves, every wave still holding every task).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import time

import numpy as np
import torch

from harmodt_fast._io import atomic_write
from harmodt_fast.batch import Batch, Prompt, offsets_from_counts
from harmodt_fast.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, prompt_from_dict
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.envs import MAX_EPISODE_STEPS, goal_variants, make_env, scripted_policy
from harmodt_fast.masks import TaskMasks
from harmodt_fast.tasks import resolve_tasks

try:
    import gymnasium as gym
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "evaluation needs gymnasium and Meta-World: pip install 'harmodt_fast[metaworld]'"
    ) from exc

OBS_DIM, ACT_DIM = 39, 4
_PROMPT_FIELDS = [f.name for f in dataclasses.fields(Prompt)]


# ---- the API -------------------------------------------------------------------------------------------------------
def evaluate(checkpoint_or_result, tasks=None, episodes: int = 10, seed: int = 0, *,
             target_return: float | None = None, max_episode_steps: int = MAX_EPISODE_STEPS,
             unseen: bool = False, merge_threshold: int | None = None, device: str = "auto",
             precision: str | None = None, backend: str | None = None, workers: int | None = None,
             max_envs: int | None = None, progress: bool = False) -> dict:
    """Rolls out a trained model in Meta-World by the paper's protocol and returns the report (a JSON-able dict).

    checkpoint_or_result: a checkpoint file, a run folder holding checkpoint.pt, an object with a `.checkpoint`
        path (what hf.train returns) or a loaded checkpoint dict.
    tasks: None (the checkpoint's tasks), a task-set name ("MT10"), a comma-separated string or a list of names.
        A task the checkpoint was not trained on is an error unless `unseen=True`: then it is evaluated with the
        consensus mask of `merge_threshold` (default: the checkpoint config's, which defaults to half the trained
        tasks).
    episodes: rollouts per task, on goal variants 0..episodes-1; seed: the Meta-World MT1 seed that draws the
        goal-variant list (0: Meta-World's default list, the one hf.collect uses).
    target_return: the return-to-go the model is conditioned on (default: config.target_return, published 4500).
    max_episode_steps: at most 500 (Meta-World truncates there); smaller only for quick checks.
    device: "auto" | "cpu" | "cuda"...; precision: None (the checkpoint config's), "auto", "fp32" or "bf16";
    backend: the backend of every masked op (linear, fused MLP, fused attention): "auto", "triton", "cpp" or
        "torch" (None: the checkpoint config's, "auto" unless it was trained with another).
    workers: environment worker processes (None: one per CPU, at most one per environment; 0: in this process).
    max_envs: at most this many environments open at once (at least one per task); None: all episodes at once.

    The report has "mean_success", "per_task" {task: {"success_rate", "mean_return", "mean_length", "successes",
    "returns", "lengths", "seen"}}, "episodes", "env_steps", "env_steps_per_s" (over the rollout loop),
    "model_time_share" (model time / wall time of the call), the timings, the device, precision and backend that ran.
    """
    wall0 = time.perf_counter()
    ckpt, source = _load(checkpoint_or_result)
    trained = list(ckpt["tasks"])
    requested = list(trained) if tasks is None else resolve_tasks(tasks)
    new = [t for t in requested if t not in trained]
    if new and not unseen:
        raise ValueError(f"{source}: tasks {new} are not in the checkpoint's task list {trained}; pass "
                         f"unseen=True (--unseen) to evaluate them with the consensus mask of the trained tasks")
    _check_counts(episodes, max_episode_steps)
    torch.manual_seed(seed)
    dev = _pick_device(device)
    config = HarmoDTConfig.from_dict(ckpt["config"])
    from harmodt_fast.ops._dispatch import check_backend

    check_backend(config.backend if backend is None else backend, dev)  # before any environment starts
    if precision is not None:
        config = dataclasses.replace(config, precision=precision)
    threshold = None
    if new:
        threshold = int(config.consensus_threshold if merge_threshold is None else merge_threshold)
        if not 1 <= threshold <= len(trained):
            raise ValueError(f"merge threshold must be in 1..{len(trained)} (the trained tasks), got {threshold}")
    # Rows must be ordered by model task id: trained tasks in checkpoint order, then the unseen ones (one segment).
    order = [t for t in trained if t in requested] + new
    task_ids = [trained.index(t) if t in trained else len(trained) for t in order]

    def make_policy():  # runs while the workers build their environments
        model, _ = model_from_checkpoint(ckpt, device=dev)
        if backend is not None:
            for layer in model.masked_layers().values():
                layer.backend = backend
        if new:
            _append_consensus_mask(model, threshold)
        mean, std = _state_stats(ckpt, order, trained)
        prompt = _prompts(ckpt, config, order, trained, mean, std, seed) if config.use_prompt else None
        return ModelPolicy(model, config, task_ids, mean, std, prompt,
                           config.target_return if target_return is None else float(target_return),
                           _autocast_dtype(config, dev))

    stats = rollout(order, episodes, make_policy, seed=seed, max_episode_steps=max_episode_steps, workers=workers,
                    max_envs=max_envs, progress=progress)
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
        "checkpoint": source, "step": int(ckpt.get("step", 0)), "method": config.method,
        "unseen_tasks": new, "merge_threshold": threshold,
        "target_return": policy.target_return, "rtg_scale": config.rtg_scale,
        "device": str(dev), "precision": "bf16" if policy.amp_dtype == torch.bfloat16 else "fp32",
        "masked_linear_backend": masked_backend,
        "wall_s": wall, "model_time_share": stats["model_s"] / wall,
    })
    if new:
        seen_rates = [report["per_task"][t]["success_rate"] for t in requested if t in trained]
        report["mean_success_seen"] = float(np.mean(seen_rates)) if seen_rates else None
        report["mean_success_unseen"] = float(np.mean([report["per_task"][t]["success_rate"] for t in new]))
    return report


# ---- checkpoint, tasks, masks and prompts --------------------------------------------------------------------------
def _load(source) -> tuple[dict, str]:
    """(checkpoint dict, a name for messages) from a path, a run folder, a TrainResult or a loaded dict; checks
    that the checkpoint's parts agree with each other."""
    if isinstance(source, dict):
        ckpt, name = source, "checkpoint dict"
    else:
        path = getattr(source, "checkpoint", source)
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"evaluate() takes a checkpoint path, a run folder, a TrainResult or a checkpoint dict, "
                             f"got {type(source).__name__}")
        ckpt, name = load_checkpoint(os.fspath(path)), os.fspath(path)
    missing = [k for k in ("config", "model", "tasks", "state_mean", "state_std") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{name}: checkpoint lacks {missing}")
    tasks, cfg = list(ckpt["tasks"]), ckpt["config"]
    T = len(tasks)
    S = cfg.get("state_dim", OBS_DIM)
    problems = []
    if cfg.get("num_tasks") != T:
        problems.append(f"config.num_tasks is {cfg.get('num_tasks')} but the task list has {T} names")
    if cfg.get("tasks") is not None and list(cfg["tasks"]) != tasks:
        problems.append(f"config.tasks {list(cfg['tasks'])} differs from the task list {tasks}")
    for key in ("state_mean", "state_std"):
        if tuple(ckpt[key].shape) != (T, S):
            problems.append(f"{key} has shape {tuple(ckpt[key].shape)}, expected ({T}, {S})")
    if (S, cfg.get("act_dim", ACT_DIM)) != (OBS_DIM, ACT_DIM):
        problems.append(f"state/action dims {S}/{cfg.get('act_dim')} are not Meta-World's {OBS_DIM}/{ACT_DIM}")
    prompts = ckpt.get("eval_prompts")
    if prompts is not None:
        for f in _PROMPT_FIELDS:
            if f not in prompts or prompts[f].shape[0] != T:
                shape = tuple(prompts[f].shape) if f in prompts else "missing"
                problems.append(f"eval_prompts[{f!r}] is {shape}, expected one row per task ({T})")
    if problems:
        raise CheckpointError(f"{name}: inconsistent checkpoint: " + "; ".join(problems))
    return ckpt, name


def _check_counts(episodes: int, max_episode_steps: int) -> None:
    if not isinstance(episodes, (int, np.integer)) or not 1 <= episodes <= 50:
        raise ValueError(f"episodes must be an integer in 1..50 (Meta-World has 50 goal variants), got {episodes!r}")
    if not isinstance(max_episode_steps, (int, np.integer)) or not 1 <= max_episode_steps <= MAX_EPISODE_STEPS:
        raise ValueError(f"max_episode_steps must be an integer in 1..{MAX_EPISODE_STEPS}, got {max_episode_steps!r}")


def _pick_device(device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return dev


def _autocast_dtype(config, device: torch.device):
    from harmodt_fast.trainer import autocast_dtype  # the trainer's rule, so a run evaluates as it trained

    return autocast_dtype(config, device)


def _append_consensus_mask(model, threshold: int) -> None:
    """Gives the model one more task id, T, whose mask is the consensus of the T trained masks."""
    masks = model.task_masks()
    if masks is None:  # prompt-dt / mtdt: no masks, every task already uses all shared weights
        return
    consensus = masks.consensus(threshold)
    model.set_masks(TaskMasks(masks.shapes, {
        n: torch.cat([masks.packed(n), consensus.packed(n).to(masks.packed(n).device)]) for n in masks.names
    }))


def _state_stats(ckpt, order, trained) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task normalisation [len(order), 39]; unseen tasks get the mean of the trained tasks' statistics."""
    mean_all, std_all = ckpt["state_mean"].float(), ckpt["state_std"].float()
    rows = [(mean_all[trained.index(t)], std_all[trained.index(t)]) if t in trained
            else (mean_all.mean(0), std_all.mean(0)) for t in order]
    return torch.stack([m for m, _ in rows]), torch.stack([s for _, s in rows])


def _prompts(ckpt, config, order, trained, mean, std, seed) -> Prompt:
    """One prompt row per task of `order` ([len(order), prompt_len, ...])."""
    stored = prompt_from_dict(ckpt.get("eval_prompts"))
    if stored is None and any(t in trained for t in order):
        raise CheckpointError("the checkpoint's method uses prompts but it has no eval_prompts")
    rows = []
    for i, task in enumerate(order):
        if task in trained:
            j = trained.index(task)
            rows.append(Prompt(**{f: getattr(stored, f)[j : j + 1] for f in _PROMPT_FIELDS}))
        else:
            rows.append(demo_prompt(task, config, mean[i], std[i], seed))
    return Prompt(**{f: torch.cat([getattr(r, f) for r in rows]) for f in _PROMPT_FIELDS})


def demo_prompt(task: str, config, mean: torch.Tensor, std: torch.Tensor, seed: int = 0) -> Prompt:
    """A [1, prompt_len] prompt for a task without stored prompts: the last prompt_len steps of one scripted-expert
    episode on the task's last goal variant, returns-to-go from that episode, states normalised by mean/std."""
    Kp = config.prompt_len
    variant = len(goal_variants(task, seed)) - 1
    env, expert = make_env(task, variant, seed), scripted_policy(task)
    obs, _ = env.reset()
    states, actions, rewards = [], [], []
    for _ in range(MAX_EPISODE_STEPS):
        action = np.clip(expert.get_action(obs), -1.0, 1.0)
        states.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    env.close()
    n = len(rewards)
    rtg = np.cumsum(np.asarray(rewards)[::-1])[::-1] / config.rtg_scale
    lo, k = max(0, n - Kp), min(Kp, n)
    pad = Kp - k  # left padding, as in training batches
    p_states = torch.zeros(1, Kp, OBS_DIM)
    p_states[0, pad:] = (torch.as_tensor(np.asarray(states[lo:]), dtype=torch.float32) - mean) / std
    p_actions = torch.zeros(1, Kp, ACT_DIM)
    p_actions[0, pad:] = torch.as_tensor(np.asarray(actions[lo:]), dtype=torch.float32)
    p_rtg = torch.zeros(1, Kp, 1)
    p_rtg[0, pad:, 0] = torch.as_tensor(rtg[lo:].copy(), dtype=torch.float32)
    p_steps = torch.zeros(1, Kp, dtype=torch.int64)
    p_steps[0, pad:] = torch.arange(lo, n).clamp(max=config.max_ep_len - 1)
    p_mask = torch.zeros(1, Kp, dtype=torch.bool)
    p_mask[0, pad:] = True
    return Prompt(p_states, p_actions, p_rtg, p_steps, p_mask)


# ---- environments: groups of Meta-World environments, stepped by gymnasium's vector env ----------------------------
class EnvGroup(gym.Env):
    """Several Meta-World environments as one gymnasium environment (one worker process's share of the episodes).

    slots: one (task, goal_indices) per environment: goal_indices[w] is the goal variant of its episode in wave w
    (None: no episode in that wave); padding slots are (None, ()). Observation [n, 39], action [n, 4].
    reset(options={"wave": w}) starts wave w; step() steps the slots whose episode is running and reports per slot
    in info: "reward", "success" and "done". The group itself never terminates, so the vector env never resets it
    behind our back.
    """

    metadata = {"render_modes": []}

    def __init__(self, slots, max_episode_steps: int = MAX_EPISODE_STEPS, seed: int = 0):
        self.slots = [(task, tuple(goals)) for task, goals in slots]
        self.max_episode_steps, self.seed = int(max_episode_steps), int(seed)
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
        for i, (task, goals) in enumerate(self.slots):
            goal = goals[wave] if task is not None and wave < len(goals) else None
            self._running[i], self._steps[i] = goal is not None, 0
            if goal is None:
                self._obs[i] = 0.0
                continue
            if self._envs[i] is None:
                self._envs[i] = make_env(task, goal, self.seed)
            else:  # same task, next goal variant: no new MuJoCo model
                self._envs[i].set_task(goal_variants(task, self.seed)[goal])
            self._obs[i] = self._envs[i].reset()[0]
        return self._obs.copy(), {"running": self._running.copy()}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(len(self.slots), ACT_DIM), -1.0, 1.0)
        n = len(self.slots)
        reward, success, done = np.zeros(n), np.zeros(n, dtype=bool), ~self._running
        for i in np.flatnonzero(self._running):
            obs, r, terminated, truncated, info = self._envs[i].step(action[i])
            self._obs[i], reward[i], success[i] = obs, r, bool(info["success"])
            self._steps[i] += 1
            if terminated or truncated or self._steps[i] >= self.max_episode_steps:
                self._running[i], done[i] = False, True
        return self._obs.copy(), float(reward.sum()), False, False, {"reward": reward, "success": success, "done": done}

    def close(self):
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


def make_vector_env(tasks, groups, max_episode_steps: int, seed: int, workers: int):
    """gymnasium AsyncVectorEnv over the groups (worker processes), or SyncVectorEnv when workers == 0."""
    fns = [functools.partial(EnvGroup, [(tasks[t] if t is not None else None, goals) for t, goals in group],
                             max_episode_steps, seed) for group in groups]
    if workers == 0:
        return gym.vector.SyncVectorEnv(fns)
    # MuJoCo and OpenMP-using parents do not survive fork reliably: start workers from a clean process.
    methods = multiprocessing.get_all_start_methods()
    return gym.vector.AsyncVectorEnv(fns, shared_memory=True, context="forkserver" if "forkserver" in methods
                                     else "spawn", daemon=True)


# ---- the rollout loop ----------------------------------------------------------------------------------------------
def rollout(tasks, episodes: int, policy, *, seed: int = 0, max_episode_steps: int = MAX_EPISODE_STEPS,
            workers: int | None = None, max_envs: int | None = None, progress: bool = False) -> dict:
    """Runs `episodes` episodes of every task (goal variants 0..episodes-1) with `policy`; all tasks' environments
    step together and the policy is asked once per step for the actions of every live episode.

    policy: .start(row_tasks) at the start of a wave (the task position of each row, non-decreasing);
    .act(obs [R, 39] float64, live bool [R]) -> actions [R, 4] (rows not live are ignored);
    .observe(rewards [R], live) after every step. Or a function that returns such a policy: it is called while
    the workers build their environments, so loading a model overlaps with that.
    Returns per-episode arrays [T, E] ("success", "returns", "lengths"), counters, timings and the policy.
    """
    tasks = list(tasks)
    _check_counts(episodes, max_episode_steps)
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
    vec = make_vector_env(tasks, groups, max_episode_steps, seed, workers)
    try:
        if workers and not hasattr(policy, "act"):
            vec.reset_async(seed=seed, options={"wave": 0})  # the workers build every environment meanwhile
            policy = policy()
            obs, _ = vec.reset_wait()
        else:
            obs, _ = vec.reset(seed=seed, options={"wave": 0})
            policy = policy if hasattr(policy, "act") else policy()
        setup_s = time.perf_counter() - t0
        bar = _progress_bar(waves * max_episode_steps, progress)
        for w, rows in enumerate(wave_rows):
            if w > 0:
                obs, _ = vec.reset(seed=seed, options={"wave": w})
            row_task = np.array([t for t, _, _ in rows])
            row_ep = np.array([e for _, e, _ in rows])
            slot = np.array([s for _, _, s in rows])
            live = np.ones(len(rows), dtype=bool)
            policy.start(row_task)
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
                policy.observe(reward, live)
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


def _progress_bar(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc="evaluate", unit="step")
        except ImportError:
            pass

    class _Silent:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Silent()


# ---- policies ------------------------------------------------------------------------------------------------------
class ModelPolicy:
    """The model behind the rollout loop: one forward per step for every live row, context in preallocated tensors.

    task_ids[i]: the model task id of task position i (non-decreasing in i); state_mean/state_std [n, 39] and
    prompt ([n, prompt_len, ...] or None) per task position.
    """

    def __init__(self, model, config, task_ids, state_mean, state_std, prompt, target_return, amp_dtype=None):
        self.model, self.config = model.eval(), config
        self.device = next(model.parameters()).device
        self.task_ids = torch.as_tensor(task_ids, dtype=torch.int64)
        if bool((self.task_ids.diff() < 0).any()):
            raise ValueError(f"task ids must be non-decreasing (rows grouped by task), got {task_ids}")
        self.num_segments = int(self.task_ids.max()) + 1
        self.mean, self.std = state_mean.to(self.device), state_std.to(self.device)
        self.prompt = prompt.to(self.device) if prompt is not None else None
        self.target_return = float(target_return)
        if not math.isfinite(self.target_return):
            raise ValueError(f"target_return must be finite, got {target_return}")
        self.amp_dtype = amp_dtype

    def start(self, row_tasks) -> None:
        K, dev = self.config.context, self.device
        rows = torch.as_tensor(np.asarray(row_tasks), dtype=torch.int64)
        R = rows.numel()
        self.row_tasks = rows.to(dev)
        self.row_ids = self.task_ids[rows]  # CPU: task offsets are host data
        self.all_offsets = offsets_from_counts(torch.bincount(self.row_ids, minlength=self.num_segments))
        self.row_mean, self.row_std = self.mean[self.row_tasks], self.std[self.row_tasks]
        self.row_prompt = None
        if self.prompt is not None:
            self.row_prompt = Prompt(**{f: getattr(self.prompt, f)[self.row_tasks] for f in _PROMPT_FIELDS})
        # 2K columns: the window [pos-K+1, pos] slides right; at the end the last K-1 columns move to the front.
        self.states = torch.zeros(R, 2 * K, self.config.state_dim, device=dev)
        self.actions = torch.zeros(R, 2 * K, self.config.act_dim, device=dev)
        self.rtg = torch.zeros(R, 2 * K, 1, device=dev)
        self.timesteps = torch.zeros(R, 2 * K, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(R, 2 * K, dtype=torch.bool, device=dev)
        self.current_rtg = torch.full((R,), self.target_return / self.config.rtg_scale, device=dev)
        self.pos, self.t = K - 1, 0

    @torch.inference_mode()
    def act(self, obs: np.ndarray, live: np.ndarray) -> np.ndarray:
        K, p = self.config.context, self.pos
        state = torch.as_tensor(obs, dtype=torch.float32).to(self.device, non_blocking=True)
        self.states[:, p] = (state - self.row_mean) / self.row_std
        self.actions[:, p] = 0.0  # the action being predicted: a zero placeholder, as in training's last step
        self.rtg[:, p, 0] = self.current_rtg
        self.timesteps[:, p] = min(self.t, self.config.max_ep_len - 1)
        self.mask[:, p] = True
        window = slice(p - K + 1, p + 1)
        fields = [self.states[:, window], self.actions[:, window], self.rtg[:, window], self.timesteps[:, window],
                  self.mask[:, window]]
        prompt, offsets, idx = self.row_prompt, self.all_offsets, None
        if not live.all():  # finished episodes leave the batch; rows stay grouped by task
            idx_cpu = torch.from_numpy(np.flatnonzero(live))
            idx = idx_cpu.to(self.device)
            fields = [f[idx] for f in fields]
            offsets = offsets_from_counts(torch.bincount(self.row_ids[idx_cpu], minlength=self.num_segments))
            if prompt is not None:
                prompt = Prompt(**{f: getattr(prompt, f)[idx] for f in _PROMPT_FIELDS})
        batch = Batch(*fields, task_offsets=offsets, prompt=prompt)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            pred = self.model(batch)[:, -1].float()
        if not bool(torch.isfinite(pred).all()):
            raise FloatingPointError("the model predicted non-finite actions: the checkpoint's weights or the "
                                     "state statistics are broken")
        if idx is None:
            self.actions[:, p] = pred
        else:
            self.actions[idx, p] = pred
        out = np.zeros((live.shape[0], ACT_DIM), dtype=np.float32)
        out[live] = pred.cpu().numpy()
        return out

    def observe(self, rewards: np.ndarray, live: np.ndarray) -> None:
        K = self.config.context
        self.current_rtg -= torch.as_tensor(rewards, dtype=torch.float32).to(self.device) / self.config.rtg_scale
        self.t += 1
        self.pos += 1
        if self.pos == 2 * K:  # the next window would run off the end: keep the last K-1 steps, at the front
            for buf in (self.states, self.actions, self.rtg, self.timesteps, self.mask):
                buf[:, : K - 1] = buf[:, K + 1 :]
            self.pos = K - 1


class ScriptedPolicy:
    """Meta-World's scripted experts behind the same interface: the oracle that checks the rollout machinery."""

    def __init__(self, tasks):
        self.experts = [scripted_policy(t) for t in tasks]

    def start(self, row_tasks) -> None:
        self.row_tasks = np.asarray(row_tasks)

    def act(self, obs: np.ndarray, live: np.ndarray) -> np.ndarray:
        out = np.zeros((obs.shape[0], ACT_DIM), dtype=np.float32)
        for r in np.flatnonzero(live):
            out[r] = np.clip(self.experts[self.row_tasks[r]].get_action(obs[r]), -1.0, 1.0)
        return out

    def observe(self, rewards, live) -> None:
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
