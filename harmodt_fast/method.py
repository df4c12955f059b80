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
from harmodt_fast.distributed import Distributed
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
    unused = {}
    for name, layer in model.masked_layers().items():
        packed = masks.packed(name)
        used = packed[0].clone()
        for t in range(1, packed.shape[0]):  # OR over tasks on the packed words: no [T, out, in] bools
            used |= packed[t]
        never = ~ops.unpack_masks(used[None], layer.weight.numel()).view(layer.weight.shape)
        if bool(never.any()):
            unused[name] = never.to(layer.weight.device)
    return unused


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
# Two forms with the same result. The whole-buffer update holds every task's gradient at once (float32 [T, P]);
# the streamed one holds G tasks' rows at a time (G from config.mask_update_memory_mb) and makes two passes over
# the update batch, in micro-batches of G tasks: the first sums the harmony gradient ḡ (float64 [P]), the second
# feeds each task's candidates with ḡ known. The per-task gradients are the same in both (a task's gradient
# comes from its own rows only), ḡ is summed in the same order, the clip uses the same norms: identical masks.
AGREEMENT_ENTRIES = 16384  # entries the streamed update samples (evenly spaced) for the task-agreement diagnostic


def masked_weights_flat(model) -> torch.Tensor:
    """The masked weights flattened and concatenated in model order, float32 [P] (a copy)."""
    return torch.cat([layer.weight.detach().flatten() for layer in model.masked_layers().values()]).float()


def masked_sizes(model) -> list[int]:
    """Entries of each masked weight, in model order (the order of the flat [P] vectors)."""
    return [layer.weight.numel() for layer in model.masked_layers().values()]


def update_group_size(config: HarmoDTConfig, total: int) -> int:
    """G: the tasks whose float32 gradient rows over the `total` masked entries fit mask_update_memory_mb (>= 1)."""
    fit = int(config.mask_update_memory_mb * 2**20 // max(1, 4 * total))
    return max(1, min(config.num_tasks, fit))


def task_gradient_rows(model, batch, first: int, last: int, out: torch.Tensor, *, losses_fn: Callable,
                       amp_dtype: torch.dtype | None) -> None:
    """Tasks first..last-1's gradients of their own losses w.r.t. their effective weights into out [last-first, P]
    (float32, overwritten), from ONE backward over those tasks' rows only: each masked layer sees the task slice of
    its masks and adds dY_tᵀX_t into its slice of `out`. The masked weights' own .grad is not computed."""
    layers = model.masked_layers()
    device = next(model.parameters()).device
    sub = batch.task_slice(first, last)
    out.zero_()
    saved = {name: layer.masks_packed for name, layer in layers.items()}
    start = 0
    for name, layer in layers.items():
        n = layer.weight.numel()
        layer.masks_packed = saved[name][first:last]  # tasks first..last-1 become 0..G-1
        layer.task_grads = out[:, start : start + n].view(last - first, *layer.weight.shape)
        layer.weight.requires_grad_(False)  # spares Σ_t M_t ⊙ G_t; the task gradients still flow
        start += n
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = losses_fn(sub)
        losses.sum().backward()  # the sum: task t's rows see only their own loss
    finally:
        for name, layer in layers.items():
            layer.masks_packed, layer.task_grads = saved[name], None
            layer.weight.requires_grad_(True)
        model.zero_grad(set_to_none=True)


def task_gradients(model, batch, *, losses_fn: Callable, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Every task's gradient of its own loss w.r.t. its effective weights, float32 [T, P] over the masked weights in
    model order: the whole buffer, from one backward over the batch."""
    T = model.task_masks().num_tasks
    grads = torch.empty(T, sum(masked_sizes(model)), device=next(model.parameters()).device)
    task_gradient_rows(model, batch, 0, T, grads, losses_fn=losses_fn, amp_dtype=amp_dtype)
    return grads


def _norm_pieces(sizes: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi) cut at the layer boundaries and every 2^20 entries (global positions: the same pieces whichever
    rows buffer holds them), as ranges relative to lo."""
    cuts = {lo, hi}
    start = 0
    for n in sizes:
        cuts.update(c for c in range(start, start + n, 1 << 20) if lo < c < hi)
        start += n
        if lo < start < hi:
            cuts.add(start)
    edges = sorted(cuts)
    return [(a - lo, b - lo) for a, b in zip(edges, edges[1:])]


def clip_factors(rows: torch.Tensor, max_norm: float, sizes: list[int], offset: int = 0,
                 dist: Distributed | None = None) -> torch.Tensor:
    """Per row (task), min(1, max_norm / (|g_t| + 1e-6)) as float32 [G] (published clip: 0.25). |g_t|² is summed in
    float64 over fixed pieces of the entries, so the whole buffer and the streamed rows give the same factors.
    rows may be a shard (entries offset..); `dist` then sums the squares over the ranks."""
    pieces = _norm_pieces(sizes, offset, offset + rows.shape[1])
    squares = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for r in range(rows.shape[0]):
        for a, b in pieces:
            squares[r] += rows[r, a:b].double().square().sum()
    if dist is not None:
        dist.sum_([squares])
    norms = squares.sqrt().float()
    return torch.clamp(max_norm / (norms + 1e-6), max=1.0)


def clip_per_task(grads: torch.Tensor, max_norm: float, sizes: list[int] | None = None) -> torch.Tensor:
    """In place: each task's gradient [T, P] scaled to norm at most max_norm (clip_factors)."""
    return grads.mul_(clip_factors(grads, max_norm, sizes or [grads.shape[1]])[:, None])


def _update_info(new_masks: TaskMasks, k, stats: dict, backend: str | None) -> dict:
    overlap = new_masks.overlap()
    off_diag = overlap[~torch.eye(new_masks.num_tasks, dtype=torch.bool)]
    return {
        "k": k if isinstance(k, int) else sum(k),
        "flips": int(stats["pruned"].sum()),
        "mean_agreement": float(stats["mean_agreement"].mean()),
        "conflict_fraction": float(stats["conflict_fraction"].mean()),
        "mean_overlap": float(off_diag.mean()) if off_diag.numel() else 1.0,
        "density": new_masks.density(),
        "backend": backend,
    }


def harmony_mask_update(model, grads: torch.Tensor, config: HarmoDTConfig, step: int) -> tuple[TaskMasks, dict]:
    """Prunes each task's k active entries with the lowest γ·a_t + s_t and regrows its k inactive entries with the
    highest a_t, where a_t = ḡ ⊙ g_t (hf.ops.harmony_update), from the whole buffer of clipped task gradients;
    sets the new masks on the model and returns them with the update's statistics for the log."""
    masks = model.task_masks()
    k = flips_per_task(config, step, masks)
    new_flat, stats = ops.harmony_update(masked_weights_flat(model), grads, masks.flat_packed(), k, config.gamma, config.score)
    new_masks = masks.with_flat_packed(new_flat)
    model.set_masks(new_masks)
    return new_masks, _update_info(new_masks, k, stats, ops.last_backend("harmony_update"))


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def streamed_mask_update(model, batch, config: HarmoDTConfig, step: int, *, losses_fn: Callable,
                         amp_dtype: torch.dtype | None, dist: Distributed = Distributed(),
                         tasks_per_pass: int | None = None) -> tuple[TaskMasks, dict, torch.Tensor]:
    """The harmony mask update without a [T, P] buffer (see the section's comment); returns the new masks (set on
    the model), the statistics and the task-agreement cosine [T, T] estimated on AGREEMENT_ENTRIES entries.

    Data-parallel: each rank computes its rows' gradients, a reduce-scatter leaves it the mean over ranks on its
    shard of the entries, it scores only that shard, and the candidates are all-gathered and merged exactly, so
    every rank applies the same flips."""
    from harmodt_fast.ops.harmony_rows import Candidates, HarmonyRows, apply_candidates, merge_candidates

    masks = model.task_masks()
    device = next(model.parameters()).device
    sizes = masked_sizes(model)
    T, P = masks.num_tasks, sum(sizes)
    group = tasks_per_pass or update_group_size(config, P)
    lo, hi = dist.shard_range(P)  # (0, P) on one process
    k = flips_per_task(config, step, masks)
    packed = masks.flat_packed()
    rows_state = HarmonyRows(T, P, packed, k, config.gamma, config.score)
    if config.score == "magnitude":
        weight = masked_weights_flat(model)[lo:hi]
    else:  # read for the magnitude score only
        weight = torch.zeros((), device=device).expand(hi - lo)
    sample_at = (torch.arange(min(P, AGREEMENT_ENTRIES), device=device) * P) // min(P, AGREEMENT_ENTRIES)
    sample = torch.zeros(T, sample_at.numel(), device=device)
    factors = torch.ones(T, device=device)
    gbar = torch.zeros(hi - lo, dtype=torch.float64, device=device)
    buffer = torch.empty(min(group, T), P, device=device)  # the one [G, P] buffer
    rng = _rng_state(device)
    for second in (False, True):
        _set_rng_state(device, rng)  # both passes see the same dropout
        for first in range(0, T, group):
            last = min(T, first + group)
            rows = buffer[: last - first]
            task_gradient_rows(model, batch, first, last, rows, losses_fn=losses_fn, amp_dtype=amp_dtype)
            if not second:
                sample[first:last] = rows[:, sample_at]
            shard = dist.reduce_scatter_mean(rows)  # the rows themselves on one process
            if not second:
                factors[first:last] = clip_factors(shard, config.task_grad_clip, sizes, lo, dist)
            shard.mul_(factors[first:last, None])
            if not second:
                for r in range(last - first):  # ḡ in the reference's order: t = 0, 1, ..., T-1
                    gbar += shard[r].double()
            else:
                rows_state.feed_rows(weight, shard, gbar, first, lo)
            del shard
        if not second:
            gbar /= torch.tensor(float(T), dtype=torch.float64, device=device)
    del buffer
    cands = rows_state.candidates()
    if dist.world > 1:
        gathered = zip(*(dist.all_gather_tensor(getattr(cands, f)) for f in Candidates.__dataclass_fields__))
        cands = merge_candidates([Candidates(*fields) for fields in gathered], rows_state.k)
        dist.average([sample])
    backend, ks = rows_state.backend, rows_state.k
    del rows_state, packed  # the flat copy of the masks: the flips go straight into the layers' masks
    stats = apply_candidates([layer.masks_packed for layer in model.masked_layers().values()], sizes, ks, cands)
    new_masks = model.task_masks()
    info = _update_info(new_masks, k, stats, backend)
    info.update(tasks_per_pass=group, passes=2 * -(-T // group))
    return new_masks, info, ops.task_agreement(sample)


def mask_update(model, batch, config: HarmoDTConfig, step: int, *, losses_fn: Callable,
                amp_dtype: torch.dtype | None, dist: Distributed = Distributed()) -> tuple[TaskMasks, dict, torch.Tensor]:
    """One harmony mask update from the update batch: the whole-buffer form when every task's gradient fits
    config.mask_update_memory_mb on one process, the streamed one otherwise; returns (masks, info, agreement)."""
    T, P = config.num_tasks, sum(masked_sizes(model))
    if dist.world == 1 and update_group_size(config, P) >= T:
        grads = task_gradients(model, batch, losses_fn=losses_fn, amp_dtype=amp_dtype)  # [T, P]
        clip_per_task(grads, config.task_grad_clip, masked_sizes(model))
        new_masks, info = harmony_mask_update(model, grads, config, step)
        info.update(tasks_per_pass=T, passes=1)
        return new_masks, info, ops.task_agreement(grads)
    return streamed_mask_update(model, batch, config, step, losses_fn=losses_fn, amp_dtype=amp_dtype, dist=dist)
