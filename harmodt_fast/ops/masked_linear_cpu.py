"""The "cpp" backend of masked_linear: the CPU fast path.

Per task segment, W ⊙ M_t is expanded from the packed bits in one C++ pass (torch.ops.harmodt_fast.masked_weight)
and the matmul goes to torch's CPU GEMM (MKL / oneDNN, bf16 under autocast); backward accumulates M_t ⊙ dY_tᵀX_t
into dW in one C++ pass. No dense mask is ever stored. Same semantics and the same task order of accumulation as
the reference in masked_linear.py.
"""
from __future__ import annotations

import torch

from harmodt_fast._ext import load_extension


def _ops():
    if load_extension() is None:  # the dispatch only selects this backend when the extension loaded
        raise RuntimeError("the C++ extension is not available")
    return torch.ops.harmodt_fast


class _MaskedLinearCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, masks_packed, row_offsets, task_grads):
        ops = _ops()
        y = x2d.new_empty(x2d.shape[0], weight.shape[0])
        for t in range(len(row_offsets) - 1):
            lo, hi = row_offsets[t], row_offsets[t + 1]
            if hi > lo:
                w_t = ops.masked_weight(weight, masks_packed[t])
                if bias is not None:
                    torch.addmm(bias, x2d[lo:hi], w_t.t(), out=y[lo:hi])
                else:
                    torch.mm(x2d[lo:hi], w_t.t(), out=y[lo:hi])
        ctx.save_for_backward(x2d, weight, masks_packed)
        ctx.row_offsets, ctx.has_bias, ctx.task_grads = row_offsets, bias is not None, task_grads
        return y

    @staticmethod
    def backward(ctx, dy):
        ops = _ops()
        x2d, weight, masks_packed = ctx.saved_tensors
        dy = dy.contiguous()
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
                torch.mm(dy[lo:hi], ops.masked_weight(weight, masks_packed[t]), out=dx[lo:hi])
            if dw is not None or ctx.task_grads is not None:
                g_t = dy[lo:hi].t() @ x2d[lo:hi]
                if dw is not None:
                    ops.masked_accumulate_(dw, g_t, masks_packed[t])
                if ctx.task_grads is not None:
                    ctx.task_grads[t] += g_t.float()
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw.to(weight.dtype) if dw is not None else None, db, None, None, None


def masked_linear_cpp(x2d, weight, bias, masks_packed, row_offsets, task_grads=None):
    return _MaskedLinearCpp.apply(x2d, weight, bias, masks_packed, row_offsets, task_grads)
