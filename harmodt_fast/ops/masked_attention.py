"""Task-masked attention block: the masked QKV projection followed by multi-head attention.

    qkv = x · (W ⊙ M_t)ᵀ + b          for the sequences (dim 0 of x) of each task t; W: [3H, H]
    q, k, v = qkv.split(H); per head:  out = softmax(q·kᵀ/√D + mask) · v      (heads concatenated: [B, L, H])

`attn_mask` (bool, True = may attend) is [L, L], [B, L, L] or [B or 1, 1, L, L], or an AttentionMask holding one
(shared by the blocks of a model so that it is bit-packed once per forward); `causal=True` additionally hides
keys after the query. Rows with no key to attend: the reference (scaled_dot_product_attention) gives NaN, the
Triton kernels 0; callers must give every row at least one key (the model lets every token see itself).
Dropout on the attention probabilities follows each backend's own random stream. The output projection (c_proj)
is not part of this op. `task_grads` is the QKV projection's per-task gradient buffer, as in masked_linear.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from harmodt_fast.ops._dispatch import register, select
from harmodt_fast.ops.masked_linear import check_masked_linear_args, masked_linear_torch
from harmodt_fast.runtime import same_device


def attention_mask_3d(attn_mask, B: int, L: int, device) -> torch.Tensor | None:
    """attn_mask as a bool [B, L, L] view (broadcast dimensions stay stride 0: nothing is copied)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        raise ValueError(f"masked_attention: attn_mask must be a bool tensor, got {getattr(attn_mask, 'dtype', attn_mask)}")
    m = attn_mask
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise ValueError(f"masked_attention: a 4-D attn_mask must be [B, 1, L, L] (one mask for all heads), "
                             f"got {tuple(m.shape)}")
        m = m[:, 0]
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3 or m.shape[0] not in (1, B) or m.shape[1:] != (L, L):
        raise ValueError(f"masked_attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to [{B}, 1, {L}, {L}]")
    if not same_device(m.device, device):
        raise ValueError(f"masked_attention: attn_mask is on {m.device}, x on {device}")
    return m.expand(B, L, L)


class AttentionMask:
    """A bool attention mask (any form attn_mask takes) that the Triton kernels' bit-packed form is made of at most
    once: a model passes one to every block of a forward instead of having each block pack the same mask."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._bits: torch.Tensor | None = None

    def bits(self, B: int, L: int) -> torch.Tensor:
        if self._bits is None:
            from harmodt_fast.kernels.masked_attention import pack_attention_mask

            self._bits = pack_attention_mask(attention_mask_3d(self.mask, B, L, self.mask.device))
        return self._bits


def check_masked_attention_args(x, weight, bias, masks_packed, task_offsets, heads, dropout_p, task_grads):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"masked_attention: x must be [B, L, H], got {tuple(getattr(x, 'shape', ()))}")
    H = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.shape != (3 * H, H):
        raise ValueError(f"masked_attention: weight must be [{3 * H}, {H}] for x {tuple(x.shape)}, "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(heads, int) or heads < 1 or H % heads:
        raise ValueError(f"masked_attention: hidden {H} must be a positive multiple of heads, got heads={heads!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"masked_attention: dropout_p must be in [0, 1), got {dropout_p}")
    return check_masked_linear_args(x, weight, bias, masks_packed, task_offsets, task_grads)


def masked_attention_torch(x3d, weight, bias, masks_packed, seq_offsets, heads, mask3=None, causal=False,
                           dropout_p=0.0, task_grads=None):
    B, L, H = x3d.shape
    row_offsets = tuple(o * L for o in seq_offsets)
    qkv = masked_linear_torch(x3d.reshape(B * L, H), weight, bias, masks_packed, row_offsets, task_grads)
    q, k, v = (t.view(B, L, heads, H // heads).transpose(1, 2) for t in qkv.view(B, L, 3 * H).split(H, dim=2))
    is_causal = False
    if causal:
        tril = torch.ones(L, L, dtype=torch.bool, device=x3d.device).tril()
        if mask3 is None:
            is_causal = True
        else:
            mask3 = mask3 & tril
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask3[:, None] if mask3 is not None else None,
                                       dropout_p=dropout_p, is_causal=is_causal)
    return y.transpose(1, 2).reshape(B, L, H)


register("masked_attention", "torch", "harmodt_fast.ops.masked_attention:masked_attention_torch")
register("masked_attention", "triton", "harmodt_fast.kernels.masked_attention:masked_attention_triton")


def masked_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    masks_packed: torch.Tensor,
    task_offsets: torch.Tensor | Sequence[int],
    heads: int,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
    task_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output [B, L, H] (before the output projection) of x [B, L, H] with the task-masked QKV
    projection (weight [3H, H]); task_offsets split the B sequences into task segments."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    offsets = check_masked_attention_args(x, weight, bias, masks_packed, task_offsets, heads, dropout_p, task_grads)
    B, L, _ = x.shape
    shared = attn_mask if isinstance(attn_mask, AttentionMask) else None
    mask3 = attention_mask_3d(shared.mask if shared is not None else attn_mask, B, L, x.device)
    chosen, fn = select("masked_attention", backend, x.device)
    packed = {"mbits": shared.bits(B, L)} if shared is not None and chosen == "triton" else {}
    with torch.autocast(x.device.type, enabled=False):
        return fn(x, weight, bias, masks_packed, offsets, heads, mask3, bool(causal), float(dropout_p), task_grads,
                  **packed)
