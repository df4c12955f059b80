"""A trained model as a policy for your own environment loop, and the one `hf.evaluate` rolls out.

    policy = hf.load_policy("runs/mt10", device="cpu")   # run folder, checkpoint, export folder or TrainResult
    policy.reset(["reach-v3", "button-press-v3"])        # one task name per environment: a batch of episodes
    actions = policy.act(observations)                   # [n_envs, 39] -> [n_envs, 4]
    policy.observe(rewards)                              # [n_envs] rewards of that step

`policy.reset("reach-v3")` (one name) runs one environment: `act(obs [39]) -> action [4]`, `observe(reward)`.

Every task acts through its own mask and its own prompt, with its own state normalisation; the return-to-go
starts at target_return / rtg_scale and drops by reward / rtg_scale after every step (the Decision Transformer
rule the model was trained with). All rows of one call go through ONE forward of the mixed-task masked model:
rows are put in model task-id order inside (the order of your environments does not matter). The context window
(the last K steps) lives in preallocated [rows, 2K, ...] tensors on the model's device: a step writes one column,
the model reads a [rows, K] view, and every K steps the last K-1 columns move to the front.

Tasks the checkpoint was not trained on (`unseen=True`) share one extra task id whose mask is the consensus of the
trained masks (a weight is kept if at least `merge_threshold` trained tasks keep it); their prompt is the last
prompt_len steps of one scripted-expert episode on the task's last goal variant, and their states are normalised
with the mean of the trained tasks' statistics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import torch

from harmodt_fast.batch import Batch, Prompt, offsets_from_counts
from harmodt_fast.checkpoint import CheckpointError, RunState, model_from_checkpoint, prompt_from_dict, read_run
from harmodt_fast.masks import TaskMasks
from harmodt_fast.runtime import autocast_dtype, pick_device

_PROMPT_FIELDS = [f.name for f in dataclasses.fields(Prompt)]


def load_policy(source, device: str = "auto", *, tasks=None, unseen: bool = False,
                merge_threshold: int | None = None, target_return: float | None = None,
                precision: str | None = None, backend: str | None = None, seed: int = 0) -> "Policy":
    """The policy of a checkpoint file, a run folder, an export folder (hf.export), a TrainResult, a loaded
    checkpoint dict or a RunState. Nothing is unpickled beyond tensors and plain containers.

    tasks: the tasks it may act on (None: the trained ones); a task it was not trained on needs unseen=True (the
    consensus mask of `merge_threshold` trained tasks, default the config's). target_return: the return-to-go it is
    conditioned on (default: by config.target_mode); precision: None (the config's), "auto", "fp32" or "bf16";
    backend: the masked_linear backend of every masked layer (None: the model's); seed: the Meta-World seed of
    the scripted episode that gives an unseen task its prompt.
    """
    state, name = read_run(source)
    _, order, new, threshold = task_order(state, tasks, unseen, merge_threshold, name)
    return policy_from_checkpoint(state, order, pick_device(device), new=new, threshold=threshold,
                                  target_return=target_return, precision=precision, backend=backend, seed=seed)


def task_order(state: RunState, tasks, unseen: bool, merge_threshold: int | None, name: str):
    """(requested, order, new, threshold): the tasks asked for, in the order asked; the same in model task-id order
    (trained ones in checkpoint order, then the unseen ones); those not trained on; the consensus threshold (None
    when there are none)."""
    trained = list(state.tasks)
    if tasks is None:
        requested = list(trained)
    else:
        from harmodt_fast.tasks import resolve_tasks

        if isinstance(tasks, str):
            names = [tasks] if tasks in trained else tasks.split(",")
        else:
            names = list(tasks)
        # trained names pass as they are (they need not be Meta-World's: e.g. Minari datasets' task names); others
        # are Meta-World names or task sets ("MT10")
        requested = []
        for t in filter(None, (n.strip() for n in names)):
            requested += [t] if t in trained else resolve_tasks(t)
        if len(set(requested)) != len(requested):
            raise ValueError(f"duplicate task names in {requested}")
    new = [t for t in requested if t not in trained]
    if new and not unseen:
        raise ValueError(f"{name}: tasks {new} are not in the checkpoint's task list {trained}; pass "
                         f"unseen=True (--unseen) to evaluate them with the consensus mask of the trained tasks")
    threshold = None
    if new:
        default = state.harmodt_config().consensus_threshold  # half the trained tasks unless set
        threshold = int(default if merge_threshold is None else merge_threshold)
        if not 1 <= threshold <= len(trained):
            raise ValueError(f"merge threshold must be in 1..{len(trained)} (the trained tasks), got {threshold}")
    order = [t for t in trained if t in requested] + new
    return requested, order, new, threshold


def policy_from_checkpoint(state: RunState, order, device: torch.device, *, new=(), threshold=None,
                           target_return=None, precision=None, backend=None, seed: int = 0,
                           model=None) -> "Policy":
    """The policy of `state` on the tasks of `order` (task_order's). model: act with this model, which holds the
    state's weights on `device` (the trainer's live one), instead of building one; it is put in eval mode and
    otherwise left as it is, so it takes no unseen tasks and no backend (both would change it)."""
    trained = list(state.tasks)
    config = state.harmodt_config()
    if precision is not None:
        config = dataclasses.replace(config, precision=precision)
    if model is not None:
        if new or backend is not None:
            raise ValueError("a given model takes no unseen tasks and no backend: they would change it")
    else:
        from harmodt_fast.ops._dispatch import check_backend

        check_backend(config.backend if backend is None else backend, device)  # at setup, not at the first act()
        model, _ = model_from_checkpoint(state, device=device)
        if backend is not None:
            for layer in model.masked_layers().values():
                layer.backend = backend
        if new:
            _append_consensus_mask(model, threshold)
    mean, std = _state_stats(state, order, trained)
    prompt = _prompts(state, config, order, trained, mean, std, seed) if config.use_prompt else None
    task_ids = [trained.index(t) if t in trained else len(trained) for t in order]
    if target_return is not None or config.target_mode == "fixed":
        targets = config.target_return if target_return is None else float(target_return)
    else:  # data-max: each trained task's best return in its data; an unseen task has none, so the fixed one
        targets = [float(state.best_return[trained.index(t)]) if t in trained else config.target_return
                   for t in order]
    return Policy(model, config, order, task_ids, mean, std, prompt, targets, autocast_dtype(config, device))


# ---- masks, normalisation and prompts -----------------------------------------------------------------------------
def _append_consensus_mask(model, threshold: int) -> None:
    """Gives the model one more task id, T, whose mask is the consensus of the T trained masks."""
    masks = model.task_masks()
    if masks is None:  # prompt-dt / mtdt: no masks, every task already uses all shared weights
        return
    consensus = masks.consensus(threshold)
    model.set_masks(TaskMasks(masks.shapes, {
        n: torch.cat([masks.packed(n), consensus.packed(n).to(masks.packed(n).device)]) for n in masks.names
    }))


def _state_stats(state: RunState, order, trained) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task normalisation [len(order), state_dim]; unseen tasks get the mean of the trained tasks' statistics."""
    mean_all, std_all = state.state_mean.float(), state.state_std.float()
    rows = [(mean_all[trained.index(t)], std_all[trained.index(t)]) if t in trained
            else (mean_all.mean(0), std_all.mean(0)) for t in order]
    return torch.stack([m for m, _ in rows]), torch.stack([s for _, s in rows])


def _prompts(state: RunState, config, order, trained, mean, std, seed) -> Prompt:
    """One prompt row per task of `order` ([len(order), prompt_len, ...])."""
    stored = prompt_from_dict(state.eval_prompts)
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
    from harmodt_fast.envs import MAX_EPISODE_STEPS, goal_variants, make_env, scripted_policy

    Kp, S, A = config.prompt_len, config.state_dim, config.act_dim
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
    p_states = torch.zeros(1, Kp, S)
    p_states[0, pad:] = (torch.as_tensor(np.asarray(states[lo:]), dtype=torch.float32) - mean) / std
    p_actions = torch.zeros(1, Kp, A)
    p_actions[0, pad:] = torch.as_tensor(np.asarray(actions[lo:]), dtype=torch.float32)
    p_rtg = torch.zeros(1, Kp, 1)
    p_rtg[0, pad:, 0] = torch.as_tensor(rtg[lo:].copy(), dtype=torch.float32)
    p_steps = torch.zeros(1, Kp, dtype=torch.int64)
    p_steps[0, pad:] = torch.arange(lo, n).clamp(max=config.max_ep_len - 1)
    p_mask = torch.zeros(1, Kp, dtype=torch.bool)
    p_mask[0, pad:] = True
    return Prompt(p_states, p_actions, p_rtg, p_steps, p_mask)


# ---- the policy ------------------------------------------------------------------------------------------------------
class Policy:
    """A model acting on a batch of episodes (see the module docstring).

    tasks[i]: the name of task position i; task_ids[i]: its model task id (non-decreasing in i);
    state_mean/state_std [n, state_dim] and prompt ([n, prompt_len, ...] or None) per task position.
    """

    def __init__(self, model, config, tasks, task_ids, state_mean, state_std, prompt, target_return, amp_dtype=None):
        self.model, self.config = model.eval(), config
        self.tasks = list(tasks)
        self.device = next(model.parameters()).device
        self.task_ids = torch.as_tensor(task_ids, dtype=torch.int64)
        if len(self.tasks) != self.task_ids.numel():
            raise ValueError(f"{len(self.tasks)} task names for {self.task_ids.numel()} task ids")
        if bool((self.task_ids.diff() < 0).any()):
            raise ValueError(f"task ids must be non-decreasing (rows grouped by task), got {task_ids}")
        self.num_segments = int(self.task_ids.max()) + 1
        self.mean, self.std = state_mean.to(self.device), state_std.to(self.device)
        self.prompt = prompt.to(self.device) if prompt is not None else None
        # one return-to-go for every task (a float) or one per task position
        targets = [float(target_return)] * len(self.tasks) if np.ndim(target_return) == 0 else list(target_return)
        if len(targets) != len(self.tasks) or not all(math.isfinite(v) for v in targets):
            raise ValueError(f"target_return must be finite, one number or one per task, got {target_return}")
        self.target_returns = torch.tensor(targets, dtype=torch.float32)
        # what reports show: the number when all tasks share it, else {task: number}
        self.target_return = targets[0] if len(set(targets)) == 1 else dict(zip(self.tasks, targets))
        self.amp_dtype = amp_dtype
        self._rows, self._single = 0, False

    # ---- the public loop -------------------------------------------------------------------------------------
    def reset(self, tasks) -> None:
        """Starts one episode per name in `tasks` (a list: batched; one string: a single environment)."""
        self._single = isinstance(tasks, str)
        names = [tasks] if self._single else list(tasks)
        if not names:
            raise ValueError("reset() needs at least one task name")
        positions = np.array([self._position(t) for t in names])
        order = np.argsort(self.task_ids[positions].numpy(), kind="stable")  # rows grouped by model task id
        self._perm = None if np.array_equal(order, np.arange(len(order))) else order
        self._start(positions if self._perm is None else positions[order])

    def act(self, observations, live=None) -> np.ndarray:
        """Actions [n, act_dim] float32 for observations [n, state_dim] (one env: [state_dim] -> [act_dim]).
        live: bool [n], False for episodes that have ended (their rows are skipped, their actions are zero)."""
        self._check_started()
        obs = np.asarray(observations, dtype=np.float64)
        if self._single:
            obs = obs[None]
        if obs.shape != (self._rows, self.config.state_dim):
            raise ValueError(f"observations have shape {tuple(np.shape(observations))}, expected "
                             f"{(self.config.state_dim,) if self._single else (self._rows, self.config.state_dim)}"
                             f" (one row per environment passed to reset)")
        live = np.ones(self._rows, dtype=bool) if live is None else np.asarray(live, dtype=bool).reshape(self._rows)
        if self._perm is None:
            out = self._act(obs, live)
        else:
            out = np.empty((self._rows, self.config.act_dim), dtype=np.float32)
            out[self._perm] = self._act(obs[self._perm], live[self._perm])
        return out[0] if self._single else out

    def observe(self, rewards) -> None:
        """The rewards [n] (one env: a number) of the step just taken."""
        self._check_started()
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if r.shape != (self._rows,):
            raise ValueError(f"rewards have shape {np.shape(rewards)}, expected ({self._rows},)")
        self._observe(r if self._perm is None else r[self._perm])

    def _check_started(self) -> None:
        if not self._rows:
            raise RuntimeError("call policy.reset(tasks) before act() and observe()")

    def _position(self, task: str) -> int:
        if task in self.tasks:
            return self.tasks.index(task)
        from harmodt_fast.tasks import to_v3

        try:
            v3 = to_v3(task)
        except ValueError:
            v3 = None
        if v3 not in self.tasks:
            raise ValueError(f"task {task!r} is not one this policy acts on ({self.tasks}); load it with "
                             f"tasks=[...] and unseen=True for tasks it was not trained on")
        return self.tasks.index(v3)

    # ---- rows in model task-id order ---------------------------------------------------------------------------
    def _start(self, row_tasks) -> None:
        K, dev = self.config.context, self.device
        rows = torch.as_tensor(np.asarray(row_tasks), dtype=torch.int64)
        R = self._rows = rows.numel()
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
        self.current_rtg = (self.target_returns[rows] / self.config.rtg_scale).to(dev)
        self.pos, self.t = K - 1, 0

    @torch.inference_mode()
    def _act(self, obs: np.ndarray, live: np.ndarray) -> np.ndarray:
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
        out = np.zeros((live.shape[0], self.config.act_dim), dtype=np.float32)
        if not live.any():
            return out
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
        out[live] = pred.cpu().numpy()
        return out

    def _observe(self, rewards: np.ndarray) -> None:
        K = self.config.context
        self.current_rtg -= torch.as_tensor(rewards, dtype=torch.float32).to(self.device) / self.config.rtg_scale
        self.t += 1
        self.pos += 1
        if self.pos == 2 * K:  # the next window would run off the end: keep the last K-1 steps, at the front
            for buf in (self.states, self.actions, self.rtg, self.timesteps, self.mask):
                buf[:, : K - 1] = buf[:, K + 1 :]
            self.pos = K - 1
