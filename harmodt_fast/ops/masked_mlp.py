"""Task-masked MLP block: two masked linear layers with an activation between them.

    y[rows of t] = act(x · (W1 ⊙ M1_t)ᵀ + b1) · (W2 ⊙ M2_t)ᵀ + b2

The semantics are exactly masked_linear -> activation -> masked_linear (the reference below composes them);
the Triton backend fuses the two matmuls (harmodt_fast.kernels.masked_mlp). `task_grads1` / `task_grads2` are
the per-task gradient buffers of the two layers, as in masked_linear.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from harmodt_fast.ops._dispatch import register, select
from harmodt_fast.ops.masked_linear import check_masked_linear_args, masked_linear_torch

ACTIVATIONS = ("relu", "gelu")


def check_masked_mlp_args(x, w1, b1, masks1, w2, b2, masks2, task_offsets, activation, task_grads1, task_grads2):
    """Validates the arguments of masked_mlp; returns the task offsets as host ints over dim 0 of x."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"masked_mlp: activation must be one of {ACTIVATIONS}, got {activation!r}")
    offsets = check_masked_linear_args(x, w1, b1, masks1, task_offsets, task_grads1)
    if not isinstance(w2, torch.Tensor) or w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"masked_mlp: w2 must be [out, {w1.shape[0]}] to follow w1 {tuple(w1.shape)}, "
                         f"got {tuple(getattr(w2, 'shape', ()))}")
    if not isinstance(masks2, torch.Tensor) or masks2.shape[:1] != masks1.shape[:1]:
        raise ValueError(f"masked_mlp: masks1 and masks2 must hold the same number of tasks, got "
                         f"{tuple(masks1.shape)} and {tuple(getattr(masks2, 'shape', ()))}")
    # the hidden activations as a shape-only stand-in (no storage) for the second layer's checks
    hidden = x.new_empty(1).as_strided((x.shape[0], w1.shape[0]), (0, 0))
    check_masked_linear_args(hidden, w2, b2, masks2, offsets, task_grads2)
    return offsets


def _act(activation: str):
    return F.relu if activation == "relu" else F.gelu


def masked_mlp_torch(x2d, w1, b1, m1, w2, b2, m2, row_offsets, activation="relu", task_grads1=None,
                     task_grads2=None):
    h = _act(activation)(masked_linear_torch(x2d, w1, b1, m1, row_offsets, task_grads1))
    return masked_linear_torch(h, w2, b2, m2, row_offsets, task_grads2)


register("masked_mlp", "torch", "harmodt_fast.ops.masked_mlp:masked_mlp_torch")
register("masked_mlp", "triton", "harmodt_fast.kernels.masked_mlp:masked_mlp_triton")


def masked_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    masks1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    masks2: torch.Tensor,
    task_offsets: torch.Tensor | Sequence[int],
    activation: str = "relu",
    backend: str = "auto",
    task_grads1: torch.Tensor | None = None,
    task_grads2: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x·(W1 ⊙ M1_t)ᵀ + b1)·(W2 ⊙ M2_t)ᵀ + b2 for the rows of each task t (x: [N, ..., in]; task_offsets
    split dim 0; activation "relu" or "gelu" (exact erf form, as nn.GELU()))."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        b1 = b1.to(dtype) if b1 is not None else None
        b2 = b2.to(dtype) if b2 is not None else None
    offsets = check_masked_mlp_args(x, w1, b1, masks1, w2, b2, masks2, task_offsets, activation, task_grads1,
                                    task_grads2)
    rows_per_item = 1
    for d in x.shape[1:-1]:
        rows_per_item *= d
    row_offsets = tuple(o * rows_per_item for o in offsets)
    _, fn = select("masked_mlp", backend, x.device)
    with torch.autocast(x.device.type, enabled=False):
        y2d = fn(x.reshape(-1, x.shape[-1]), w1, b1, masks1, w2, b2, masks2, row_offsets, activation,
                 task_grads1, task_grads2)
    return y2d.view(*x.shape[:-1], w2.shape[0])
