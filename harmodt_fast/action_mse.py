"""Held-out action error of a trained run: the model's teacher-forced action MSE per task on expert episodes it
never trained on, a low-variance second metric beside evaluation success.

Every expert episode is cut into consecutive windows of `context` steps (the last one shorter, padded on the left
as training rows are), so every step is predicted once. A window is built as the sampler builds a training row
(states normalised per task, actions clipped to [-1, 1], returns-to-go of the episode divided by rtg_scale,
timesteps from the episode start) but with the RUN's state statistics, and with the task's prompt as the run
acts with it (the checkpoint's evaluation prompt; none for MTDT). The error is `HarmoDT.task_losses`, the training
loss: the mean squared error over valid steps and action dimensions.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import torch

from harmodt_fast.batch import Batch, Prompt, offsets_from_counts

ACTION_MSE_NAME = "action_mse.json"
ACTION_MSE_FORMAT = "harmodt_fast.action_mse/1"
_ROWS = 512  # windows per forward


def expert_windows(data, context: int, max_ep_len: int, rtg_scale: float, mean, std) -> dict[str, torch.Tensor]:
    """The windows of one task's episodes (a TaskData): states, actions, returns_to_go, timesteps, attention_mask
    as in a Batch ([W, context, ...]), states normalised by `mean`/`std` ([state_dim] each)."""
    from harmodt_fast.data.sampler import returns_to_go

    starts = np.asarray(data.episode_starts, dtype=np.int64)
    rtg = returns_to_go(data.rewards, starts) / float(rtg_scale)
    # window w covers steps [lo, hi) of its episode, right-aligned in `context` slots
    lo = np.concatenate([np.arange(a, b, context) for a, b in zip(starts[:-1], starts[1:])]).astype(np.int64)
    ep = np.searchsorted(starts, lo, side="right") - 1
    hi = np.minimum(lo + context, starts[ep + 1])
    slot = np.arange(context)
    pad = context - (hi - lo)
    valid = slot[None, :] >= pad[:, None]
    idx = np.where(valid, lo[:, None] + slot[None, :] - pad[:, None], lo[:, None])
    w = torch.from_numpy(valid)
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    obs = torch.from_numpy(np.asarray(data.observations, dtype=np.float32)[idx])
    act = torch.from_numpy(np.asarray(data.actions, dtype=np.float32)[idx]).clamp_(-1.0, 1.0)
    steps = torch.from_numpy(np.minimum(idx - starts[ep][:, None], max_ep_len - 1))
    return {"states": (obs - mean) / std * w[..., None], "actions": act * w[..., None],
            "returns_to_go": torch.from_numpy(rtg[idx].astype(np.float32))[..., None] * w[..., None],
            "timesteps": steps * w, "attention_mask": w}


def action_mse(run, dataset, device: str = "cpu", rows: int = _ROWS) -> dict:
    """{"per_task": {task: mse}, "mean": mean over tasks, "steps": {task: steps scored}, "checkpoint_step"} of a
    run (run folder, checkpoint, RunState; hf.load_policy's sources) on `dataset` (a path or loaded dataset that
    holds every task the run trained on). rows: windows per forward (the result does not depend on it)."""
    from harmodt_fast.checkpoint import read_run
    from harmodt_fast.data import load_dataset
    from harmodt_fast.policy import load_policy

    state, name = read_run(run)
    data = load_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    where = getattr(data, "path", dataset)
    missing = [t for t in state.tasks if t not in data.tasks]
    if missing:
        raise ValueError(f"{where}: no episodes of task(s) {missing} that {name} trained on")
    policy = load_policy(state, device)
    cfg, model = policy.config, policy.model
    amp = (torch.autocast(policy.device.type, dtype=policy.amp_dtype) if policy.amp_dtype is not None
           else contextlib.nullcontext())
    per_task, counts = {}, {}
    for i, task in enumerate(policy.tasks):
        arrays = data.arrays(task)
        if arrays.observations.shape[1] != cfg.state_dim or arrays.actions.shape[1] != cfg.act_dim:
            raise ValueError(f"{where}: task {task} has state/action dims {arrays.observations.shape[1]}/"
                             f"{arrays.actions.shape[1]}; {name} expects {cfg.state_dim}/{cfg.act_dim}")
        windows = expert_windows(arrays, cfg.context, cfg.max_ep_len, cfg.rtg_scale, policy.mean[i].cpu(),
                                 policy.std[i].cpu())
        tid = int(policy.task_ids[i])
        err, steps = 0.0, 0
        for lo in range(0, windows["states"].shape[0], rows):
            part = {k: v[lo : lo + rows].to(policy.device) for k, v in windows.items()}
            n = part["states"].shape[0]
            counts_per_id = [0] * policy.num_segments
            counts_per_id[tid] = n
            prompt = None
            if policy.prompt is not None:
                prompt = Prompt(**{k: v[i : i + 1].expand(n, *v.shape[1:]) for k, v in vars(policy.prompt).items()})
            batch = Batch(**part, task_offsets=offsets_from_counts(counts_per_id), prompt=prompt)
            with torch.inference_mode(), amp:
                loss = model.task_losses(batch)[tid]
            valid = int(part["attention_mask"].sum())
            err += float(loss) * valid  # task_losses is the mean over this part's valid steps
            steps += valid
        per_task[task], counts[task] = err / steps, steps
    return {"per_task": per_task, "mean": float(np.mean(list(per_task.values()))), "steps": counts,
            "checkpoint_step": int(state.step)}


def cached_action_mse(run_dir: str, dataset_path: str, device: str = "cpu", step: int | None = None) -> dict:
    """The run's action MSE on the dataset at `dataset_path`, from `run_dir/action_mse.json` when that was computed
    for the same dataset folder and checkpoint step, else computed and written there. step: the checkpoint step
    expected (a suite's last step; then a matching cache is used without reading the checkpoint); None: the
    checkpoint's."""
    from harmodt_fast._io import atomic_write
    from harmodt_fast.checkpoint import read_run

    path = os.path.join(run_dir, ACTION_MSE_NAME)
    data_name = os.path.basename(os.path.normpath(dataset_path))
    run = run_dir
    if step is None:  # read once: the computation below takes the state itself
        run = read_run(run_dir)[0]
        step = run.step
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("format") != ACTION_MSE_FORMAT:
            raise ValueError(f"{path}: format {cached.get('format')!r}, expected {ACTION_MSE_FORMAT!r}")
        if cached.get("expert_data") == data_name and cached.get("checkpoint_step") == step:
            return cached
    result = {"format": ACTION_MSE_FORMAT, "expert_data": data_name, **action_mse(run, dataset_path, device)}
    if result["checkpoint_step"] != step:
        raise ValueError(f"{run_dir}: the checkpoint is at step {result['checkpoint_step']}, expected {step}")
    atomic_write(path, lambda f: json.dump(result, f, indent=1), binary=False)
    return result
