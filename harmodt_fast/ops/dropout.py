"""Dropout: each entry of x is zeroed with probability p and the others scaled by 1/(1-p); backward multiplies
by the same mask and scale. Backends:
- "torch": F.dropout (torch's generator), the reference;
- "cpp": the mask from a counter-based hash of a seed (csrc/dropout.cpp), in parallel and the same for any
  thread count; torch's CPU bernoulli_ draws from one sequential generator and was a sixth of a CPU training step.
  The seed comes from torch's default generator as a tensor (no host read), so a checkpoint's saved RNG state
  resumes the same masks.
The two backends draw different masks from the same generator state; both are dropout with probability p.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harmodt_fast.ops._dispatch import register, select


class _DropoutCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)  # advances the default generator
        y, keep = torch.ops.harmodt_fast.dropout(x, seed, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return y

    @staticmethod
    def backward(ctx, dy):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(dy, keep, ctx.scale), None


def dropout_torch(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=True)


def dropout_cpp(x: torch.Tensor, p: float) -> torch.Tensor:
    return _DropoutCpp.apply(x, p)


register("dropout", "torch", "harmodt_fast.ops.dropout:dropout_torch")
register("dropout", "cpp", "harmodt_fast.ops.dropout:dropout_cpp")


def dropout(x: torch.Tensor, p: float, training: bool = True, backend: str = "auto") -> torch.Tensor:
    """F.dropout(x, p, training) on the chosen backend (the identity when not training or p == 0)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    _, fn = select("dropout", backend, x.device)
    return fn(x, p)
