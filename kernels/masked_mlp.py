"""Task-masked MLP block: y = act(x·(W1 ⊙ M1_t)ᵀ + b1)·(W2 ⊙ M2_t)ᵀ + b2, forward and backward.

One "chain" kernel runs two masked matmuls back to back for a tile of rows: for each chunk of the hidden width
it computes the chunk of the first product, applies the elementwise step in registers and feeds it straight into
the second product, so the hidden activations need not be read back from memory (nor written, at inference).
    forward:   h = act(x·V1 + b1) (stored for the backward when training);  y = h·V2 + b2
    backward:  dh = (dy·(W2 ⊙ M2_t)) ⊙ act'(aux) (stored: dW1 needs it);  dx = dh·(W1 ⊙ M1_t)
It holds the whole output width of a row tile in registers, so it is used while that width fits (FUSE_MAX_OUT);
wider layers take two `masked_mm` launches with the activation (or its derivative) fused into the first one's
epilogue. Weight gradients, bias gradients and per-task gradients come from `masked_dw`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from harmodt_fast.kernels._common import (
    ACT_GELU,
    ACTIVATIONS,
    activation,
    activation_grad,
    allow_tf32,
    autotune_configs,
    check_rows_fit,
    device_offsets,
    dot_acc,
    m_bucket,
    masked_weight_tile,
    new_output,
    next_pow2,
    task_tile,
    task_tile_grid,
)
from harmodt_fast.kernels.masked_linear import EPI_ACT, EPI_ACT_GRAD, EPI_NONE, masked_dw_op, masked_mm_op

# widest output (rounded up to a power of two) that one program keeps in registers: fp32 [BLOCK_M, 256]
FUSE_MAX_OUT = 256
# the training forward uses the chain kernel too when it applies (benchmarks flip this to compare)
FUSE_TRAINING = True


_CHAIN_CONFIGS = [(64, 64, 64, 8, 2), (64, 32, 128, 8, 2), (128, 64, 64, 8, 2), (64, 64, 128, 8, 2),
                  (32, 64, 64, 4, 2), (64, 64, 64, 8, 3)]  # (BLOCK_M, BLOCK_K, BLOCK_H, warps, stages)


@triton.autotune(configs=autotune_configs(("BLOCK_M", "BLOCK_K", "BLOCK_H"), _CHAIN_CONFIGS, (16, 32, 64)),
                 key=["D_IN", "D_MID", "D_OUT", "M_BUCKET", "T", "BACKWARD", "ACT", "STORE_MID", "STORE_PRE", "HAS_B1",
                      "HAS_B2", "ALIGNED1", "ALIGNED2", "TF32"])
@triton.jit
def _masked_chain_kernel(
    a_ptr, w1_ptr, m1_ptr, w2_ptr, m2_ptr, offs_ptr, b1_ptr, b2_ptr, aux_ptr, mid_ptr, pre_ptr, out_ptr,
    M, D_IN, D_MID, D_OUT, LD1, LD2, W1_WORDS, W2_WORDS, T, M_BUCKET,
    BACKWARD: tl.constexpr, CONTIG: tl.constexpr, ALIGNED1: tl.constexpr, ALIGNED2: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, STORE_MID: tl.constexpr, STORE_PRE: tl.constexpr,
    TF32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # forward views: V1(k, j) = W1[j, k], V2(j, o) = W2[o, j] (bits run along the reduction axis: CONTIG);
    # backward views: V1(o, j) = W2[o, j], V2(j, k) = W1[j, k] (bits run along the output axis)
    t, row0, row_end = task_tile(tl.program_id(0), offs_ptr, T, BLOCK_T, BLOCK_M)
    if t < T:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        outc = tl.arange(0, BLOCK_OUT)
        out_ok = outc < D_OUT
        mw1 = m1_ptr + t * W1_WORDS
        mw2 = m2_ptr + t * W2_WORDS
        acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
        for h0 in range(0, D_MID, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            h_ok = hc < D_MID
            acc_h = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, D_IN, BLOCK_K):
                kc = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + rows64[:, None] * D_IN + kc[None, :],
                            mask=row_ok[:, None] & (kc < D_IN)[None, :], other=0.0)
                w = masked_weight_tile(w1_ptr, mw1, k0, h0, D_IN, D_MID, LD1, CONTIG, ALIGNED1, BLOCK_K, BLOCK_H)
                acc_h = dot_acc(a, w, acc_h, TF32)
            mid_offs = rows64[:, None] * D_MID + hc[None, :]
            ok = row_ok[:, None] & h_ok[None, :]
            if BACKWARD:
                aux = tl.load(aux_ptr + mid_offs, mask=ok, other=0.0)
                acc_h = acc_h * activation_grad(aux, ACT)
            else:
                if HAS_B1:
                    acc_h += tl.load(b1_ptr + hc, mask=h_ok, other=0.0).to(tl.float32)[None, :]
                if STORE_PRE:
                    tl.store(pre_ptr + mid_offs, acc_h.to(pre_ptr.dtype.element_ty), mask=ok)
                acc_h = activation(acc_h, ACT)
            # rounded to the input dtype exactly as if it had gone through memory, so fused == unfused
            hv = acc_h.to(a_ptr.dtype.element_ty)
            if STORE_MID:
                tl.store(mid_ptr + mid_offs, hv, mask=ok)
            w2 = masked_weight_tile(w2_ptr, mw2, h0, 0, D_MID, D_OUT, LD2, CONTIG, ALIGNED2, BLOCK_H, BLOCK_OUT)
            acc = dot_acc(hv, w2, acc, TF32)
        if HAS_B2:
            acc += tl.load(b2_ptr + outc, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * D_OUT + outc[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & out_ok[None, :])


def chain_fits(d_out: int) -> bool:
    return max(32, next_pow2(d_out)) <= FUSE_MAX_OUT


def launch_masked_chain(a, w_first, m_first, w_second, m_second, offs, backward: bool, act: int,
                        b1=None, b2=None, aux=None, store_mid=False, store_pre=False):
    """Forward (backward=False): w_first = W1 [HID, IN], w_second = W2 [OUT, HID]; returns (y, h, pre).
    Backward: a = dY, w_first = W2, w_second = W1, aux = pre (GELU) or h (ReLU); returns (dx, dh, None)."""
    M = a.shape[0]
    if backward:
        d_in, d_mid = w_first.shape
        d_out = w_second.shape[1]
        ld1, ld2 = d_mid, d_out
    else:
        d_mid, d_in = w_first.shape
        d_out = w_second.shape[0]
        ld1, ld2 = d_in, d_mid
    if a.shape[1] != d_in or w_second.shape != ((d_mid, d_out) if backward else (d_out, d_mid)):
        raise ValueError(f"masked_chain: shapes do not chain: A {tuple(a.shape)}, {tuple(w_first.shape)}, "
                         f"{tuple(w_second.shape)}")
    check_rows_fit(M, max(d_in, d_mid, d_out))
    dt, dev = a.dtype, a.device
    out = new_output((M, d_out), dt, dev)
    mid = new_output((M, d_mid), dt, dev) if store_mid else None
    pre = new_output((M, d_mid), dt, dev) if store_pre else None
    T = offs.numel() - 1
    if M == 0:
        return out, mid, pre
    dummy = out
    _masked_chain_kernel[lambda meta: task_tile_grid(M, T, meta["BLOCK_M"])](
        a, w_first, m_first, w_second, m_second, offs,
        b1 if b1 is not None else dummy, b2 if b2 is not None else dummy, aux if aux is not None else dummy,
        mid if mid is not None else dummy, pre if pre is not None else dummy, out,
        M, d_in, d_mid, d_out, ld1, ld2, m_first.shape[1], m_second.shape[1], T, m_bucket(M),
        BACKWARD=backward, CONTIG=not backward, ALIGNED1=ld1 % 32 == 0, ALIGNED2=ld2 % 32 == 0, HAS_B1=b1 is not None,
        HAS_B2=b2 is not None, ACT=act, STORE_MID=store_mid, STORE_PRE=store_pre, TF32=allow_tf32(dt),
        BLOCK_T=max(16, next_pow2(T)), BLOCK_OUT=max(32, next_pow2(d_out)),
    )
    return out, mid, pre


@torch.library.custom_op("harmodt_fast::masked_chain", mutates_args=())
def masked_chain_op(a: torch.Tensor, w_first: torch.Tensor, m_first: torch.Tensor, w_second: torch.Tensor,
                    m_second: torch.Tensor, offsets: Sequence[int], b1: Optional[torch.Tensor],
                    b2: Optional[torch.Tensor], aux: Optional[torch.Tensor], backward: bool, act: int,
                    store_mid: bool, store_pre: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    out, mid, pre = launch_masked_chain(c(a), c(w_first), c(m_first), c(w_second), c(m_second),
                                        device_offsets(offsets, a.device), backward, act, b1=c(b1), b2=c(b2),
                                        aux=c(aux), store_mid=store_mid, store_pre=store_pre)
    return out, (mid if mid is not None else a.new_empty(0)), (pre if pre is not None else a.new_empty(0))


@masked_chain_op.register_fake
def _(a, w_first, m_first, w_second, m_second, offsets, b1, b2, aux, backward, act, store_mid, store_pre):
    M = a.shape[0]
    d_mid = w_first.shape[1] if backward else w_first.shape[0]
    d_out = w_second.shape[1] if backward else w_second.shape[0]
    return (a.new_empty(M, d_out), a.new_empty((M, d_mid) if store_mid else (0,)),
            a.new_empty((M, d_mid) if store_pre else (0,)))


def _forward(x2d, w1, b1, m1, w2, b2, m2, offs, act, save):
    """(y, h, pre): h and pre are kept only when `save` (pre only for GELU, whose derivative needs it)."""
    store_pre = save and act == ACT_GELU
    if chain_fits(w2.shape[0]) and (FUSE_TRAINING or not save):
        y, h, pre = masked_chain_op(x2d, w1, m1, w2, m2, offs, b1, b2, None, False, act, save, store_pre)
        return y, (h if save else None), (pre if store_pre else None)
    h, pre = masked_mm_op(x2d, w1, m1, offs, b1, None, True, EPI_ACT, act, store_pre)
    y, _ = masked_mm_op(h, w2, m2, offs, b2, None, True, EPI_NONE, 0, False)
    return y, h, (pre if store_pre else None)


class MaskedMLPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, w1, b1, m1, w2, b2, m2, row_offsets, act, tg1, tg2):
        offs = list(row_offsets)
        y, h, pre = _forward(x2d, w1, b1, m1, w2, b2, m2, offs, act, save=True)
        ctx.save_for_backward(x2d, w1, m1, w2, m2, h, pre)
        ctx.task_grads = tg1, tg2  # outputs accumulated in place (see masked_linear's MaskedLinearFn)
        ctx.offs, ctx.act = offs, act
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, w1, m1, w2, m2, h, pre = ctx.saved_tensors
        tg1, tg2 = ctx.task_grads
        offs, act = ctx.offs, ctx.act
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        aux = pre if act == ACT_GELU else h
        dx = None
        if need[0] and chain_fits(w1.shape[1]):
            dx, dh, _ = masked_chain_op(dy, w2, m2, w1, m1, offs, None, None, aux, True, act, True, False)
        else:
            dh, _ = masked_mm_op(dy, w2, m2, offs, None, aux, False, EPI_ACT_GRAD, act, False)
            if need[0]:
                dx, _ = masked_mm_op(dh, w1, m1, offs, None, None, False, EPI_NONE, 0, False)
        dw1 = db1 = dw2 = db2 = None
        if need[4] or (need[5] and ctx.has_b2) or tg2 is not None:
            dw2, db2 = masked_dw_op(dy, h, m2, offs, tg2, need[4], need[5] and ctx.has_b2, w2.dtype)
        if need[1] or (need[2] and ctx.has_b1) or tg1 is not None:
            dw1, db1 = masked_dw_op(dh, x2d, m1, offs, tg1, need[1], need[2] and ctx.has_b1, w1.dtype)
        keep = lambda g, flag: g if flag else None  # noqa: E731
        return (dx, keep(dw1, need[1]), keep(db1, need[2] and ctx.has_b1), None, keep(dw2, need[4]),
                keep(db2, need[5] and ctx.has_b2), None, None, None, None, None)


def masked_mlp_triton(x2d, w1, b1, m1, w2, b2, m2, row_offsets, activation="relu", task_grads1=None,
                      task_grads2=None):
    """The "triton" backend of hf.ops.masked_mlp (arguments already checked; row_offsets: host ints)."""
    act = ACTIVATIONS[activation]
    tensors = (x2d, w1, b1, w2, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return MaskedMLPFn.apply(x2d, w1, b1, m1, w2, b2, m2, tuple(row_offsets), act, task_grads1, task_grads2)
    y, _, _ = _forward(x2d, w1, b1, m1, w2, b2, m2, list(row_offsets), act, save=False)
    return y
