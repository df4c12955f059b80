"""HarmoDT, top to bottom: the inner step, the flip schedule and the harmony mask update (docs/method.md has the
facts and their sources). The trainer owns the loop, checkpoints, logging and processes, and calls these.

The three methods share everything here and differ in two switches of HarmoDTConfig:
    harmodt       per-task masks (config.use_masks), updated by the harmony rule (config.updates_masks), and
                  trajectory prompts (config.use_prompt)
    random-masks  the same initial per-task masks, never updated (the mechanism ablation), prompts
    prompt-dt  no masks, prompts
    mtdt       no masks, no prompts
Each task's loss is HarmoDT.task_losses: the action MSE of its rows, through its own mask.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from harmodt_fast import ops
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.distributed import Distributed
from harmodt_fast.masks import TaskMasks
from harmodt_fast.ops.harmony import score_needs_weight
from harmodt_fast.ops.harmony_rows import HarmonyRows
from harmodt_fast.task_gradients import TaskGradientPasses, gather_candidates


# ---- the inner level: one optimiser step ----------------------------------------------------------------------
def learning_rate(config: HarmoDTConfig, step: int) -> float:
    """Linear warm-up to config.lr over warmup_steps, then constant (as published)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


def make_optimizer(model, config: HarmoDTConfig) -> torch.optim.AdamW:
    """AdamW over every parameter as one fused kernel (CPU and CUDA): no per-parameter ops, and the step counters
    stay tensors (no host reads). With compile="step" the foreach form instead, capturable (step counters and lr
    as tensors, on the device), which torch.compile traces and fuses (it does not trace into the fused kernel)."""
    if config.compile == "step":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True,
                                 capturable=True)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads a saved AdamW state; the implementation stays this optimiser's (a state saved by the unfused AdamW
    of older versions, or by another compile mode, would otherwise switch it to that one's)."""
    implementation = [{k: g.get(k) for k in ("fused", "foreach", "capturable")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, implementation):
        group.update(flags)


def step_task(config: HarmoDTConfig, step: int) -> int | None:
    """The one task a round-robin step trains (the published schedule); None: every task in the step."""
    return step % config.num_tasks if config.schedule == "round-robin" else None


def step_loss(config: HarmoDTConfig, losses: torch.Tensor) -> torch.Tensor:
    """Mixed steps average the per-task losses, so dW = (1/T) Σ_t M_t ⊙ G_t: each task moves only its own
    entries. A round-robin batch holds one task: its loss."""
    return losses.sum() if config.schedule == "round-robin" else losses.mean()


@dataclasses.dataclass
class FrozenEntries:
    """Entries a step must not move (masks: name -> bool, per masked layer with any) and the values the step
    restores them to after the optimiser moved them (None: the weights as they are when the step starts)."""

    masks: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor] | None = None


def unused_entries(model) -> FrozenEntries:
    """The entries no task uses (a mixed step must not move them), with their values now: no step moves them
    until the masks change, so this one copy serves every step until then (no copy per step)."""
    masks = model.task_masks()
    if masks is None:
        return FrozenEntries({}, {})
    unused, values = {}, {}
    for name, layer in model.masked_layers().items():
        packed = masks.packed(name)
        used = packed[0].clone()
        for t in range(1, packed.shape[0]):  # OR over tasks on the packed words: no [T, out, in] bools
            used |= packed[t]
        never = ~ops.unpack_masks(used[None], layer.weight.numel()).view(layer.weight.shape)
        if bool(never.any()):
            unused[name] = never.to(layer.weight.device)
            values[name] = layer.weight.detach().clone()
    return FrozenEntries(unused, values)


def frozen_entries(model, task: int | None, unused: FrozenEntries) -> FrozenEntries:
    """Entries this step must not move: with one task per step every entry outside its mask, as published (the
    momentum of earlier tasks' steps and the weight decay would move them); with all tasks, the unused ones."""
    masks = model.task_masks()
    if task is None or masks is None:
        return unused
    device = next(model.parameters()).device
    return FrozenEntries({n: ~masks.to_dense(n, task).to(device) for n in masks.names})


class NonFiniteStep(FloatingPointError):
    """The first step (1-based `step`) whose loss or gradient was not finite: `tasks` the task ids whose loss was
    not (empty: only the gradient), `grad_norm` the total gradient norm; `taken` whether the optimiser moved."""

    def __init__(self, step: int, tasks: list[int], grad_norm: float, taken: bool):
        super().__init__(f"step {step}: non-finite loss (task ids {tasks}) or gradient (norm {grad_norm})")
        self.step, self.tasks, self.grad_norm, self.taken = step, tasks, grad_norm, taken


class StepWatch:
    """The first step with a non-finite loss or gradient, recorded on the device by inner_step without a host
    synchronisation. `before_step` (where a read-back stalls no device queue: the CPU) makes inner_step read it
    back and refuse the step before the optimiser moves anything; on CUDA a training step never waits for the
    device, so the caller reads it back (check()) at the steps that synchronise anyway."""

    def __init__(self, num_tasks: int, device: torch.device):
        self.before_step = device.type == "cpu"
        self._step = torch.zeros((), dtype=torch.long, device=device)  # 0: none yet
        self._tasks = torch.zeros(num_tasks, dtype=torch.bool, device=device)
        self._grad_norm = torch.zeros((), dtype=torch.float32, device=device)

    def record(self, step: int, losses: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad_tasks = ~torch.isfinite(losses.detach())
        first = (self._step == 0) & (bad_tasks.any() | ~torch.isfinite(grad_norm))
        self._step.masked_fill_(first, step)
        self._tasks.copy_(torch.where(first, bad_tasks, self._tasks))
        self._grad_norm.copy_(torch.where(first, grad_norm.detach().float(), self._grad_norm))

    def check(self, taken: bool = True) -> None:
        """Raises NonFiniteStep when a step was recorded (one host synchronisation)."""
        # on the CPU the flag is read from memory, without dispatching an op: a CPU step dispatches no
        # _local_scalar_dense, the op that marks a host synchronisation on CUDA (tests count it)
        step = int(self._step.numpy()) if self.before_step else int(self._step)
        if step:
            raise NonFiniteStep(step, torch.nonzero(self._tasks).flatten().tolist(), float(self._grad_norm), taken)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clips the gradients' total norm to max_norm in one foreach pass; returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def apply_gradients(optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    frozen: FrozenEntries) -> None:
    """The optimiser step, then the frozen entries of the masked layers' `weights` (name -> weight) restored bit
    for bit (torch.where with the precomputed masks, not weight[mask]: a nonzero, a host sync per layer)."""
    kept = frozen.values if frozen.values is not None else {n: weights[n].detach().clone() for n in frozen.masks}
    optimizer.step()
    with torch.no_grad():
        for name, f in frozen.masks.items():
            torch.where(f, kept[name], weights[name], out=weights[name])


def inner_step(model, optimizer, batch, config: HarmoDTConfig, frozen: FrozenEntries, *,
               losses_fn: Callable, amp_dtype: torch.dtype | None, watch: StepWatch | None = None,
               step: int = 0, clip_fn: Callable = clip_gradients,
               apply_fn: Callable = apply_gradients) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, clip and AdamW step over one batch; returns (loss, per-task losses) as device tensors
    (no host synchronisation, but for `watch.before_step`). Data-parallel, losses_fn is the DistributedDataParallel
    module around the model's losses: its backward leaves the gradients averaged over the processes (the returned
    losses are this process's). Frozen entries are restored after the step, bit for bit. `watch` records whether
    this step (1-based `step`) had a non-finite loss or gradient (StepWatch). clip_fn and apply_fn are
    clip_gradients and apply_gradients or their compiled forms (compile="step", harmodt_fast/compiled.py).
    Its ops do not grow with the task count: the masked layers run equal task segments as batched GEMMs, the clip
    is foreach, the optimiser is the caller's (the trainer's is a fused AdamW), the restore one op per layer."""
    device = next(model.parameters()).device
    model.train()
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        losses = losses_fn(batch)  # [T] (0 for tasks without rows)
    loss = step_loss(config, losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_fn(list(model.parameters()), config.grad_clip)
    if watch is not None:
        watch.record(step, losses, grad_norm)
        if watch.before_step:
            watch.check(taken=False)
    layers = model.masked_layers()
    apply_fn(optimizer, {name: layers[name].weight for name in frozen.masks}, frozen)
    return loss.detach(), losses.detach()


# ---- the flip schedule --------------------------------------------------------------------------------------------
def flip_count(step: int, total_steps: int, eta_min: int = 0, eta_max: int = 100) -> int:
    """Flips per mask update: a raised-cosine bump, eta_min at the start and end, eta_max at mid-training."""
    phase = 2.0 * math.pi * step / max(1, total_steps)
    value = eta_max + 0.5 * (eta_min - eta_max) * (1.0 + math.cos(phase))
    return int(math.floor(value + 0.5))


def flips_per_task(config: HarmoDTConfig, step: int, masks: TaskMasks) -> int | list[int]:
    """k of this update: the schedule's, or flip_fraction of each task's active weights when that is set."""
    if config.flip_fraction > 0:
        return [int(round(config.flip_fraction * c)) for c in masks.active_counts().tolist()]
    return flip_count(step, config.steps, config.eta_min, config.eta_max)


# ---- the outer level: the harmony mask update ---------------------------------------------------------------------
def mask_update_due(config: HarmoDTConfig, step: int) -> bool:
    """Whether the masks are updated after optimiser step `step` (1-based): every mask_interval steps, not after
    the last one."""
    return config.updates_masks and step % config.mask_interval == 0 and step < config.steps


def mask_update(model, batch, config: HarmoDTConfig, step: int, *, losses_fn: Callable,
                amp_dtype: torch.dtype | None, dist: Distributed = Distributed(),
                tasks_per_pass: int | None = None) -> tuple[TaskMasks, dict, torch.Tensor]:
    """One harmony mask update from the update batch. With g_t task t's gradient of its own loss w.r.t. its
    effective weights (its own rows only), clipped to norm task_grad_clip, and ḡ = (1/T) Σ_t g_t:

        a_t      = ḡ ⊙ g_t                                     agreement with the harmony gradient
        prune_t  = the k_t active entries with the lowest γ·a_t + s_t   (s_t: config.score, e.g. g_t² "fisher")
        regrow_t = the k_t inactive entries with the highest a_t
        k_t      = min(k, active, inactive) of task t              (so the density is kept)

    ties to the lower index (ops/harmony.py holds the reference). The gradients come G tasks at a time within
    config.mask_update_memory_mb (None, "auto": every task when the [T, P] rows fit half of a CUDA device's free
    memory; task_gradients.update_group_size; `tasks_per_pass` forces G); without dropout the masks do not
    depend on G.
    Returns the new masks (set on the model), the update's statistics and the task-gradient cosine [T, T]."""
    masks = model.task_masks()
    k = flips_per_task(config, step, masks)
    grads = TaskGradientPasses(model, batch, config, losses_fn=losses_fn, amp_dtype=amp_dtype, dist=dist,
                               tasks_per_pass=tasks_per_pass)
    gbar = grads.harmony_gradient()  # ḡ, float64 [P] (this rank's shard); None: the rows are kept, summed below
    selection = HarmonyRows(masks.num_tasks, grads.P, masks.flat_packed(), k, config.gamma, config.score)
    weight = grads.weights(score_needs_weight(config.score))
    for first, rows in grads.clipped_rows():  # rows [G, P]: g_t of tasks first..first+G-1
        selection.feed_rows(weight, rows, gbar, first, grads.lo)  # a_t, both keys, each task's best k of each
    agreement = grads.agreement()
    grads.release()
    candidates = gather_candidates(dist, selection.candidates(), selection.k)
    stats = model.apply_mask_flips(selection.k, candidates)
    new_masks = model.task_masks()
    return new_masks, _update_info(new_masks, k, stats, selection.backend, grads), agreement


def _update_info(masks: TaskMasks, k, stats: dict, backend: str, grads: TaskGradientPasses) -> dict:
    overlap = masks.overlap()  # [T, T], counted on the masks' device, on the host
    off_diag = overlap[~torch.eye(masks.num_tasks, dtype=torch.bool)]
    # the statistics' scalars in one read (apply_candidates leaves them on the host: no device synchronisation)
    flips, agreement, conflict = torch.stack([stats["pruned"].sum(), stats["mean_agreement"].mean(),
                                              stats["conflict_fraction"].mean()]).tolist()
    return {
        "k": k if isinstance(k, int) else sum(k),
        "flips": int(flips),
        "mean_agreement": agreement,
        "conflict_fraction": conflict,
        "mean_overlap": float(off_diag.mean()) if off_diag.numel() else 1.0,
        "density": masks.density(),
        "backend": backend,
        "tasks_per_pass": grads.group,
        "passes": grads.passes,
    }
