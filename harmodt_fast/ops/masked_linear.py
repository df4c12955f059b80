"""Task-masked linear layer: rows task_offsets[t]:task_offsets[t+1] of x use weight ⊙ M_t.

    y[rows of t] = x[rows of t] · (W ⊙ M_t)ᵀ + b

Backward (what every backend must give):
    dX[rows of t] = dY[rows of t] · (W ⊙ M_t)
    dW            = Σ_t M_t ⊙ (dY_tᵀ X_t)
    db            = Σ_rows dY
and, when a `task_grads` buffer [T, out, in] is passed, the per-task dense gradients dY_tᵀ X_t (the real gradient
of each task's effective weight, at active and inactive entries alike) are added into it: the mask update needs
them and gets them from this one backward pass.

This file holds the argument checks shared by all backends, the per-task loop of "torch" (the plain-PyTorch
reference that defines the semantics) and the "cpp" CPU fast path, whose mask expansion is C++
(csrc/masked_linear.cpp). When the task segments are of equal size (every mixed training batch, every mask
update's pass), "cpp" runs a fixed number of ops whatever the task count: all T' masked weights expanded in one
C++ call, one batched GEMM per product, one C++ reduction Σ_t M_t ⊙ G_t; otherwise the per-task loop. The
"triton" backend is kernels/masked_linear.py.
"""
from __future__ import annotations

from typing import Sequence

import torch

from harmodt_fast.ops._dispatch import register, select
from harmodt_fast.ops.packing import unpack_masks_torch, words_for


def offsets_to_list(task_offsets: torch.Tensor | Sequence[int], num_rows: int, num_tasks: int) -> tuple[int, ...]:
    """Checks `task_offsets` against a batch of `num_rows` rows and masks for `num_tasks` tasks; returns host ints.

    Pass a CPU tensor (or a list) to avoid a device synchronisation.
    """
    if isinstance(task_offsets, torch.Tensor):
        if task_offsets.dim() != 1 or task_offsets.dtype.is_floating_point or task_offsets.dtype == torch.bool:
            raise ValueError(
                f"task_offsets must be a 1-D integer tensor, got shape {tuple(task_offsets.shape)} {task_offsets.dtype}"
            )
        offsets = tuple(int(v) for v in task_offsets.tolist())
    else:
        offsets = tuple(int(v) for v in task_offsets)
    if len(offsets) < 2:
        raise ValueError(f"task_offsets needs at least 2 entries (one task), got {list(offsets)}")
    if len(offsets) - 1 > num_tasks:
        raise ValueError(f"task_offsets names {len(offsets) - 1} tasks but the masks hold only {num_tasks}")
    if offsets[0] != 0 or offsets[-1] != num_rows:
        raise ValueError(
            f"task_offsets must start at 0 and end at the batch size {num_rows}, got {offsets[0]}..{offsets[-1]}"
        )
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"task_offsets must be non-decreasing, got {list(offsets)}")
    return offsets


def check_masked_linear_args(x, weight, bias, masks_packed, task_offsets, task_grads):
    """Validates the arguments of masked_linear; returns the task offsets as host ints over dim 0 of x."""
    for name, t in (("x", x), ("weight", weight), ("masks_packed", masks_packed)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"masked_linear: {name} must be a tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"masked_linear: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 2 or x.shape[-1] != in_features:
        raise ValueError(
            f"masked_linear: x {tuple(x.shape)} must be [N, ..., {in_features}] for weight {tuple(weight.shape)}"
        )
    if not x.dtype.is_floating_point or x.dtype != weight.dtype:
        raise ValueError(f"masked_linear: x ({x.dtype}) and weight ({weight.dtype}) must share one floating dtype")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"masked_linear: bias must be [{out_features}] {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    words = words_for(out_features * in_features)
    if masks_packed.dtype != torch.int32 or masks_packed.dim() != 2 or masks_packed.shape[1] != words:
        raise ValueError(
            f"masked_linear: masks_packed must be int32 [T, {words}] for weight {tuple(weight.shape)}, "
            f"got {tuple(masks_packed.shape)} {masks_packed.dtype}"
        )
    devices = {t.device for t in (x, weight, masks_packed)} | ({bias.device} if bias is not None else set())
    if task_grads is not None:
        if task_grads.shape != (masks_packed.shape[0], out_features, in_features) or task_grads.dtype != torch.float32:
            raise ValueError(
                f"masked_linear: task_grads must be float32 [{masks_packed.shape[0]}, {out_features}, {in_features}], "
                f"got {tuple(task_grads.shape)} {task_grads.dtype}"
            )
        devices.add(task_grads.device)
    if len(devices) != 1:
        raise ValueError(f"masked_linear: x, weight, bias, masks_packed, task_grads are on different devices {devices}")
    return offsets_to_list(task_offsets, x.shape[0], masks_packed.shape[0])


def task_mask(masks_packed: torch.Tensor, task: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Task `task`'s mask as a dense 0/1 tensor of `shape` (reference path only: never on a fast path)."""
    numel = shape[0] * shape[1]
    return unpack_masks_torch(masks_packed[task : task + 1], numel).view(shape).to(dtype)


class _PerTaskMasks:
    """How a per-task backend expands task t's mask: into W ⊙ M_t for the matmuls, and into dW += M_t ⊙ G."""

    @staticmethod
    def weight(weight, masks_packed, t):
        return weight * task_mask(masks_packed, t, weight.shape, weight.dtype)

    @staticmethod
    def accumulate(dw, g, masks_packed, t):
        dw += task_mask(masks_packed, t, g.shape, g.dtype) * g


class _CppMasks:
    """The same from the packed bits in one C++ pass each (torch.ops.harmodt_fast.*): no dense mask exists."""

    @staticmethod
    def weight(weight, masks_packed, t):
        return torch.ops.harmodt_fast.masked_weight(weight, masks_packed[t])

    @staticmethod
    def accumulate(dw, g, masks_packed, t):
        torch.ops.harmodt_fast.masked_accumulate_(dw, g, masks_packed[t])


class _MaskedLinearPerTask(torch.autograd.Function):
    """One matmul per task segment with that task's masked weight: the reference semantics ("torch", with
    _PerTaskMasks) and the CPU fast path ("cpp", with _CppMasks; the GEMMs go to MKL / oneDNN)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, masks_packed, row_offsets, task_grads, masks):
        y = x2d.new_empty(x2d.shape[0], weight.shape[0])
        for t in range(len(row_offsets) - 1):
            lo, hi = row_offsets[t], row_offsets[t + 1]
            if hi > lo:
                w_t = masks.weight(weight, masks_packed, t)
                if bias is not None:
                    torch.addmm(bias, x2d[lo:hi], w_t.t(), out=y[lo:hi])
                else:
                    torch.mm(x2d[lo:hi], w_t.t(), out=y[lo:hi])
        ctx.save_for_backward(x2d, weight, masks_packed)
        ctx.row_offsets, ctx.has_bias, ctx.task_grads, ctx.masks = row_offsets, bias is not None, task_grads, masks
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, masks_packed = ctx.saved_tensors
        masks, dy = ctx.masks, dy.contiguous()
        dx = torch.zeros_like(x2d) if ctx.needs_input_grad[0] else None
        # Σ_t over tasks accumulates in fp32 (fp64 for fp64 weights): bf16 sums would lose bits per task
        dw = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) \
            if ctx.needs_input_grad[1] else None
        offsets = ctx.row_offsets
        for t in range(len(offsets) - 1):
            lo, hi = offsets[t], offsets[t + 1]
            if hi == lo:
                continue
            if dx is not None:
                torch.mm(dy[lo:hi], masks.weight(weight, masks_packed, t), out=dx[lo:hi])
            if dw is not None or ctx.task_grads is not None:
                g_t = dy[lo:hi].t() @ x2d[lo:hi]
                if dw is not None:
                    masks.accumulate(dw, g_t.to(dw.dtype), masks_packed, t)
                if ctx.task_grads is not None:
                    ctx.task_grads[t] += g_t.float()
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw.to(weight.dtype) if dw is not None else None, db, None, None, None, None


class _MaskedLinearEqualSegments(torch.autograd.Function):
    """The cpp path for T' task segments of n rows each, in ops that do not grow with T' (per layer: forward 2,
    backward 6 or fewer): W_t = W ⊙ M_t for all t in one C++ call [T', out, in], then batched GEMMs. The masked
    weights are expanded again in backward rather than kept (T' x out x in per layer would be saved)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, masks_packed, tasks, task_grads):
        masks = masks_packed[:tasks]
        x3 = x2d.view(tasks, -1, x2d.shape[1])  # [T', n, in]
        w_all = torch.ops.harmodt_fast.masked_weight(weight, masks).transpose(1, 2)  # [T', in, out]
        y3 = torch.baddbmm(bias, x3, w_all) if bias is not None else torch.bmm(x3, w_all)  # [T', n, out]
        ctx.save_for_backward(x2d, weight, masks)
        ctx.has_bias, ctx.task_grads = bias is not None, task_grads
        return y3.view(x2d.shape[0], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, masks = ctx.saved_tensors
        tasks = masks.shape[0]
        dy3 = dy.contiguous().view(tasks, -1, dy.shape[1])  # [T', n, out]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            w_all = torch.ops.harmodt_fast.masked_weight(weight, masks)  # [T', out, in]
            dx = torch.bmm(dy3, w_all).view(x2d.shape)
        if ctx.needs_input_grad[1] or ctx.task_grads is not None:
            g = torch.bmm(dy3.transpose(1, 2), x2d.view(tasks, -1, x2d.shape[1]))  # G_t = dY_tᵀ X_t [T', out, in]
            if ctx.needs_input_grad[1]:
                # Σ_t in fp32 (fp64 for fp64 weights), tasks added in order as the per-task loop does
                dw = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
                torch.ops.harmodt_fast.masked_accumulate_(dw, g, masks)
                dw = dw.to(weight.dtype)
            if ctx.task_grads is not None:
                ctx.task_grads[:tasks] += g
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db, None, None, None


def equal_segments(row_offsets: Sequence[int]) -> bool:
    """Whether the task segments all hold the same (non-zero) number of rows."""
    n = row_offsets[1] - row_offsets[0]
    return n > 0 and all(b - a == n for a, b in zip(row_offsets, row_offsets[1:]))


def masked_linear_torch(x2d, weight, bias, masks_packed, row_offsets, task_grads=None):
    return _MaskedLinearPerTask.apply(x2d, weight, bias, masks_packed, row_offsets, task_grads, _PerTaskMasks)


def masked_linear_cpp(x2d, weight, bias, masks_packed, row_offsets, task_grads=None):
    from harmodt_fast._ext import load_extension

    if load_extension() is None:  # the dispatch only selects this backend when the extension loaded
        raise RuntimeError("the C++ extension is not available")
    if equal_segments(row_offsets):
        return _MaskedLinearEqualSegments.apply(x2d, weight, bias, masks_packed, len(row_offsets) - 1, task_grads)
    return _MaskedLinearPerTask.apply(x2d, weight, bias, masks_packed, row_offsets, task_grads, _CppMasks)


register("masked_linear", "torch", "harmodt_fast.ops.masked_linear:masked_linear_torch")
register("masked_linear", "cpp", "harmodt_fast.ops.masked_linear:masked_linear_cpp")
register("masked_linear", "triton", "harmodt_fast.kernels.masked_linear:masked_linear_triton")


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    masks_packed: torch.Tensor,
    task_offsets: torch.Tensor | Sequence[int],
    backend: str = "auto",
    task_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x · (W ⊙ M_t)ᵀ + b for the rows of each task t.

    x: [N, ..., in]; `task_offsets` [T'+1] splits dim 0 into contiguous task segments (T' <= masks' T; empty
    segments allowed). weight: [out, in] like nn.Linear. masks_packed: int32 [T, ceil(out*in/32)] from
    `pack_masks`. task_grads: optional float32 [T, out, in] buffer that backward adds dY_tᵀX_t into.
    Under autocast, x, weight and bias are cast to the autocast dtype first, as F.linear would.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    offsets = check_masked_linear_args(x, weight, bias, masks_packed, task_offsets, task_grads)
    rows_per_item = 1
    for d in x.shape[1:-1]:
        rows_per_item *= d
    row_offsets = tuple(o * rows_per_item for o in offsets)
    _, fn = select("masked_linear", backend, x.device)
    with torch.autocast(x.device.type, enabled=False):
        y2d = fn(x.reshape(-1, x.shape[-1]), weight, bias, masks_packed, row_offsets, task_grads)
    return y2d.view(*x.shape[:-1], weight.shape[0])
