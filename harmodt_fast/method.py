"""HarmoDT, top to bottom: the inner step, the flip schedule and the harmony mask update (docs/method.md has the
facts and their sources). The trainer owns the loop, checkpoints, logging and processes, and calls these.

The three methods share everything here and differ in two switches of HarmoDTConfig:
    harmodt    per-task masks (config.use_masks) and trajectory prompts (config.use_prompt)
    prompt-dt  no masks, prompts
    mtdt       no masks, no prompts
Each task's loss is HarmoDT.task_losses: the action MSE of its rows, through its own mask.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from harmodt_fast import ops
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.masks import TaskMasks


# ---- the inner level: one optimiser step ----------------------------------------------------------------------
def learning_rate(config: HarmoDTConfig, step: int) -> float:
    """Linear warm-up to config.lr over warmup_steps, then constant (as published)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


def step_task(config: HarmoDTConfig, step: int) -> int | None:
    """The one task a round-robin step trains (the published schedule); None: every task in the step."""
    return step % config.num_tasks if config.schedule == "round-robin" else None


def step_loss(config: HarmoDTConfig, losses: torch.Tensor) -> torch.Tensor:
    """Mixed steps average the per-task losses, so dW = (1/T) Σ_t M_t ⊙ G_t: each task moves only its own
    entries. A round-robin batch holds one task: its loss."""
    return losses.sum() if config.schedule == "round-robin" else losses.mean()


def unused_entries(model) -> dict[str, torch.Tensor]:
    """Per masked layer with any, the entries no task uses (a mixed step must not move them)."""
    masks = model.task_masks()
    if masks is None:
        return {}
    layers = model.masked_layers()
    unused = {n: ~masks.to_dense(n).any(0) for n in masks.names}
    return {n: u.to(layers[n].weight.device) for n, u in unused.items() if bool(u.any())}


def frozen_entries(model, task: int | None, unused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries this step must not move: with one task per step every entry outside its mask, as published (the
    momentum of earlier tasks' steps and the weight decay would move them); with all tasks, the unused ones."""
    masks = model.task_masks()
    if task is None or masks is None:
        return unused
    device = next(model.parameters()).device
    return {n: ~masks.to_dense(n, task).to(device) for n in masks.names}


def inner_step(model, optimizer, batch, config: HarmoDTConfig, frozen: dict[str, torch.Tensor], *,
               losses_fn: Callable, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, clip and AdamW step over one batch; returns (loss, per-task losses) as device tensors
    (no host synchronisation). Data-parallel, losses_fn is the DistributedDataParallel module around the model's
    losses: its backward leaves the gradients averaged over the processes (the returned losses are this
    process's). Frozen entries are restored after the step, bit for bit."""
    device = next(model.parameters()).device
    model.train()
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        losses = losses_fn(batch)  # [T] (0 for tasks without rows)
    loss = step_loss(config, losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    layers = model.masked_layers()
    # torch.where with precomputed masks, not weight[mask] (a nonzero: a host sync per layer)
    kept = {n: layers[n].weight.detach().clone() for n in frozen}
    optimizer.step()
    with torch.no_grad():
        for name, f in frozen.items():
            weight = layers[name].weight
            weight.copy_(torch.where(f, kept[name], weight))
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
def task_gradients(model, batch, *, losses_fn: Callable, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Every task's gradient of its own loss w.r.t. its effective weights, float32 [T, P] over the masked weights
    in model order, from ONE backward pass: each masked layer adds dY_tᵀX_t into its slice of the buffer."""
    layers = model.masked_layers()
    sizes = [layer.weight.numel() for layer in layers.values()]
    device = next(model.parameters()).device
    num_tasks = next(iter(layers.values())).masks_packed.shape[0]
    grads = torch.zeros(num_tasks, sum(sizes), device=device)
    start = 0
    for layer, n in zip(layers.values(), sizes):
        layer.task_grads = grads[:, start : start + n].view(num_tasks, *layer.weight.shape)
        start += n
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = losses_fn(batch)
        losses.sum().backward()  # the sum: task t's rows see only their own loss
    finally:
        for layer in layers.values():
            layer.task_grads = None
        model.zero_grad(set_to_none=True)
    return grads


def clip_per_task(grads: torch.Tensor, max_norm: float) -> torch.Tensor:
    """In place: each task's gradient scaled to norm at most max_norm (published: 0.25)."""
    norms = grads.norm(dim=1, keepdim=True)
    return grads.mul_(torch.clamp(max_norm / (norms + 1e-6), max=1.0))


def harmony_mask_update(model, grads: torch.Tensor, config: HarmoDTConfig, step: int) -> tuple[TaskMasks, dict]:
    """Prunes each task's k active entries with the lowest γ·a_t + s_t and regrows its k inactive entries with the
    highest a_t, where a_t = ḡ ⊙ g_t (hf.ops.harmony_update); sets the new masks on the model and returns them
    with the update's statistics for the log."""
    masks = model.task_masks()
    k = flips_per_task(config, step, masks)
    weight_flat = torch.cat([layer.weight.detach().flatten() for layer in model.masked_layers().values()]).float()
    new_flat, stats = ops.harmony_update(weight_flat, grads, masks.flat_packed(), k, config.gamma, config.score)
    new_masks = masks.with_flat_packed(new_flat)
    model.set_masks(new_masks)
    overlap = new_masks.overlap()
    off_diag = overlap[~torch.eye(new_masks.num_tasks, dtype=torch.bool)]
    return new_masks, {
        "k": k if isinstance(k, int) else sum(k),
        "flips": int(stats["pruned"].sum()),
        "mean_agreement": float(stats["mean_agreement"].mean()),
        "conflict_fraction": float(stats["conflict_fraction"].mean()),
        "mean_overlap": float(off_diag.mean()) if off_diag.numel() else 1.0,
        "density": new_masks.density(),
        "backend": ops.last_backend("harmony_update"),
    }
