"""The harmony mask update (DESIGN.md section 2), plain-PyTorch reference.

For every task t, with g_t its gradient (of the effective weight, so inactive entries have real values) and
ḡ = (1/T) Σ_t g_t:
    a_t     = ḡ ⊙ g_t                               agreement with the harmony gradient
    prune   = the k_t ACTIVE entries with the lowest  γ·a_t + s_t
              s_t = g_t² ("fisher"), |θ| ("magnitude"), 0 ("harmony")
    regrow  = the k_t INACTIVE entries (before this update) with the highest a_t
Ties go to the lower index. k_t = min(k, active count, inactive count) (documented clamp), so density is kept.

Exact arithmetic, which every backend reproduces bit for bit: values are converted to float64; ḡ is the sum over
tasks in order t = 0..T-1, then divided by T; a_t = ḡ·g_t; the prune score is (γ·a_t) + s_t, with no fused
multiply-add.
"""
from __future__ import annotations

from typing import Sequence

import torch

from harmodt_fast.ops._dispatch import register, select
from harmodt_fast.ops.packing import pack_masks_torch, unpack_masks_torch, words_for

SCORES = ("fisher", "magnitude", "harmony")


def check_harmony_args(weight_flat, grads, masks_packed, k, gamma, score) -> list[int]:
    """Validates the arguments of harmony_update; returns the requested flips per task."""
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or not grads.dtype.is_floating_point:
        raise ValueError(f"harmony_update: grads must be a floating tensor [T, P], got {getattr(grads, 'shape', grads)}")
    T, P = grads.shape
    if not isinstance(weight_flat, torch.Tensor) or weight_flat.shape != (P,) or not weight_flat.dtype.is_floating_point:
        raise ValueError(
            f"harmony_update: weight_flat must be a floating tensor [{P}] to match grads {tuple(grads.shape)}, "
            f"got {getattr(weight_flat, 'shape', weight_flat)}"
        )
    if (
        not isinstance(masks_packed, torch.Tensor)
        or masks_packed.dtype != torch.int32
        or masks_packed.shape != (T, words_for(P))
    ):
        raise ValueError(
            f"harmony_update: masks_packed must be int32 [{T}, {words_for(P)}] for grads {tuple(grads.shape)}, "
            f"got {getattr(masks_packed, 'shape', None)} {getattr(masks_packed, 'dtype', None)}"
        )
    if len({grads.device, weight_flat.device, masks_packed.device}) != 1:
        raise ValueError("harmony_update: weight_flat, grads and masks_packed must be on one device")
    if score not in SCORES:
        raise ValueError(f"harmony_update: unknown score {score!r}; expected one of {SCORES}")
    gamma = float(gamma)
    if gamma != gamma or gamma in (float("inf"), float("-inf")):
        raise ValueError(f"harmony_update: gamma must be finite, got {gamma}")
    ks = [int(k)] * T if isinstance(k, (int,)) or (isinstance(k, torch.Tensor) and k.dim() == 0) else [int(v) for v in k]
    if len(ks) != T or any(v < 0 for v in ks):
        raise ValueError(f"harmony_update: k must be a non-negative int or {T} of them, got {k}")
    bad = (~torch.isfinite(grads)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"harmony_update: grads contain NaN or inf for task(s) {bad[:10]}")
    if score == "magnitude" and not torch.isfinite(weight_flat).all():
        raise ValueError("harmony_update: weight_flat contains NaN or inf")
    return ks


def harmony_update_torch(weight_flat, grads, masks_packed, ks: list[int], gamma: float, score: str):
    T, P = grads.shape
    gbar = grads[0].double().clone()
    for t in range(1, T):
        gbar += grads[t].double()
    gbar /= T
    masks = unpack_masks_torch(masks_packed, P)
    new_masks = masks.clone()
    stats = {name: torch.zeros(T, dtype=torch.float64) for name in ("pruned", "regrown", "mean_agreement", "conflict_fraction")}
    magnitude = weight_flat.double().abs() if score == "magnitude" else None
    for t in range(T):
        g = grads[t].double()
        agreement = gbar * g
        if score == "fisher":
            prune_score = gamma * agreement + g * g
        elif score == "magnitude":
            prune_score = gamma * agreement + magnitude
        else:
            prune_score = gamma * agreement + 0.0
        active_idx = masks[t].nonzero().flatten()
        inactive_idx = (~masks[t]).nonzero().flatten()
        k_t = min(ks[t], active_idx.numel(), inactive_idx.numel())
        if k_t > 0:
            prune = active_idx[torch.sort(prune_score[active_idx], stable=True).indices[:k_t]]
            grow = inactive_idx[torch.sort(agreement[inactive_idx], descending=True, stable=True).indices[:k_t]]
            new_masks[t, prune] = False
            new_masks[t, grow] = True
        stats["pruned"][t] = stats["regrown"][t] = k_t
        stats["mean_agreement"][t] = agreement.mean().item() if P else 0.0
        stats["conflict_fraction"][t] = (agreement < 0).double().mean().item() if P else 0.0
    return pack_masks_torch(new_masks), stats


register("harmony_update", "torch", "harmodt_fast.ops.harmony:harmony_update_torch")


def harmony_update(
    weight_flat: torch.Tensor,
    grads: torch.Tensor,
    masks_packed: torch.Tensor,
    k: int | Sequence[int],
    gamma: float = 10.0,
    score: str = "fisher",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One harmony mask update for all tasks; returns (new packed masks [T, W], stats).

    weight_flat [P]: the masked weights, flattened and concatenated; grads [T, P] (fp32 or bf16): each task's
    gradient of its effective weight; masks_packed int32 [T, ceil(P/32)]; k: flips each way, an int or one per
    task (clamped to the task's active and inactive counts). stats: float64 CPU tensors [T] "pruned", "regrown"
    (flips made), "mean_agreement" (mean of a_t over all P entries) and "conflict_fraction" (share with a_t < 0).
    """
    ks = check_harmony_args(weight_flat, grads, masks_packed, k, gamma, score)
    _, fn = select("harmony_update", backend, grads.device)
    return fn(weight_flat, grads, masks_packed, ks, float(gamma), score)
