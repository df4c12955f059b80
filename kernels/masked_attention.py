"""Task-masked attention block: the masked QKV projection feeding (causal) attention, forward and backward.

    qkv = x·(W ⊙ M_t)ᵀ + b  for the sequences of each task t   (W: [3H, H], like GPT-2's c_attn)
    out = softmax(q·kᵀ/√D, masked) · v  per (sequence, head), heads back in [B, L, H] layout

One program holds a whole (sequence, head): Decision Transformer sequences are short (tens to hundreds of tokens).
Inference (no gradient, no dropout, L <= FUSED_MAX_L): ONE kernel computes q, k, v from x and the masked weight
rows and then the attention, never writing qkv. Training: `masked_mm` writes qkv once; the attention kernels read
it in place and write their outputs in final layouts (no split/transpose copies); the attention mask is bit-packed
once per call; the backward (dK, dV per key block, then dQ per query block) recomputes the probabilities from the
saved log-sum-exp, with no atomics. Rows with no allowed key output 0 (scaled_dot_product_attention gives NaN).
Dropout uses a counter-based generator keyed on (seed, sequence, head, query, key), so the backward regenerates
the keep-mask; `dropout_keep_mask` exposes it for tests. The seed is a device tensor (see seed_tensor).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from harmodt_fast.kernels._common import (
    allow_tf32,
    autotune_configs,
    device_offsets,
    dot_acc,
    dot_exact,
    masked_weight_tile,
    new_output,
    next_pow2,
)
from harmodt_fast.kernels.masked_linear import EPI_NONE, masked_dw_op, masked_mm_op

LOG2E = 1.4426950408889634
FUSED_MAX_L = 128
KEEP_BLOCK = 16  # dropout_keep_mask's query and key block


@triton.jit
def _keep(seed, bh, i, j, L, p_drop):
    offs = (bh * L + i[:, None]) * L + j[None, :]
    return tl.rand(seed, offs) >= p_drop


@triton.jit
def _allowed(b, i, j0, L, mbits_ptr, smb, WPR, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr):
    """Which (query i, key j0..j0+BN) pairs may attend: in range, allowed by the bit-packed mask, causal."""
    j = j0 + tl.arange(0, BN)
    ok = (i < L)[:, None] & (j < L)[None, :]
    if HAS_MASK:
        # the mask comes bit-packed (one int32 word per 32 keys): a [BM, BN] tile needs BM*BN/32 loads, so it
        # costs few registers and little traffic next to q, k and v
        base = mbits_ptr + b * smb
        sh = tl.arange(0, 32)
        if BN == 32:
            words = tl.load(base + i * WPR + j0 // 32, mask=i < L, other=0)
            bits = (words[:, None] >> sh[None, :]) & 1
        else:
            jw = j0 // 32 + tl.arange(0, BN // 32)
            words = tl.load(base + i[:, None] * WPR + jw[None, :], mask=(i < L)[:, None] & (jw * 32 < L)[None, :],
                            other=0)
            bits = tl.reshape((words[:, :, None] >> sh[None, None, :]) & 1, (BM, BN))
        ok = ok & (bits != 0)
    if CAUSAL:
        ok = ok & (j[None, :] <= i[:, None])
    return ok


def _prune_attn(configs, named_args, **kwargs):
    cap = max(32, next_pow2(named_args["L"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
    return kept or configs[:1]


_MN = ("BLOCK_M", "BLOCK_N")  # config rows: (BLOCK_M, BLOCK_N, warps, stages)
_ATTN_TUNING = dict(key=["L", "D", "HEADS", "HAS_MASK", "CAUSAL", "DROPOUT"],
                    prune_configs_by={"early_config_prune": _prune_attn})


@triton.autotune(configs=autotune_configs(_MN, [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2),
                                                (32, 64, 4, 2)], (16, 32)), **_ATTN_TUNING)
@triton.jit
def _attn_fwd_kernel(
    qkv_ptr, mbits_ptr, out_ptr, lse_ptr, L, H, HEADS, D, qk_scale, smb, WPR, seed_ptr, p_drop,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)  # see attention_fwd_grid
    qb = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_ok = i < L
    d_ok = d < D
    row = (b * L).to(tl.int64)
    stride = 3 * H
    q = tl.load(qkv_ptr + (row + i)[:, None] * stride + h * D + d[None, :], mask=i_ok[:, None] & d_ok[None, :],
                other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (qb + 1) * BLOCK_M)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for j0 in range(0, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        kv_ok = (j < L)[:, None] & d_ok[None, :]
        kv_offs = (row + j)[:, None] * stride + h * D + d[None, :]
        k = tl.load(qkv_ptr + kv_offs + H, mask=kv_ok, other=0.0)
        v = tl.load(qkv_ptr + kv_offs + 2 * H, mask=kv_ok, other=0.0)
        s = dot_exact(q, tl.trans(k)) * qk_scale
        ok = _allowed(b, i, j0, L, mbits_ptr, smb, WPR, HAS_MASK, CAUSAL, BLOCK_M, BLOCK_N)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, i, j, L, p_drop), p / (1.0 - p_drop), 0.0)
        acc = acc * alpha[:, None] + dot_exact(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(out_ptr + (row + i)[:, None] * H + h * D + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=i_ok[:, None] & d_ok[None, :])
    lse = tl.where(has, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(tl.where(has, l_i, 1.0)), 0.0)
    tl.store(lse_ptr + bh.to(tl.int64) * L + i, lse, mask=i_ok)


@triton.jit
def _probs(q, k, lse, b, i, j0, L, mbits_ptr, smb, WPR, qk_scale, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr):
    s = dot_exact(q, tl.trans(k)) * qk_scale
    ok = _allowed(b, i, j0, L, mbits_ptr, smb, WPR, HAS_MASK, CAUSAL, BM, BN)
    return tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _query_rows(qkv_ptr, do_ptr, out_ptr, lse_base, row, i, stride, H, h, D, d, d_ok, L):
    """A query block's q, dO, the softmax-backward term delta = rowsum(dO * O), its log-sum-exp and its mask."""
    q_ok = (i < L)[:, None] & d_ok[None, :]
    q = tl.load(qkv_ptr + (row + i)[:, None] * stride + h * D + d[None, :], mask=q_ok, other=0.0)
    do = tl.load(do_ptr + (row + i)[:, None] * H + h * D + d[None, :], mask=q_ok, other=0.0)
    o = tl.load(out_ptr + (row + i)[:, None] * H + h * D + d[None, :], mask=q_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse = tl.load(lse_base + i, mask=i < L, other=0.0)
    return q, do, delta, lse, q_ok


@triton.jit
def _key_rows(qkv_ptr, row, j, stride, H, h, D, d, d_ok, L):
    """A key block's k and v (read in place from the packed QKV projection) and its mask."""
    kv_ok = (j < L)[:, None] & d_ok[None, :]
    kv_offs = (row + j)[:, None] * stride + h * D + d[None, :]
    k = tl.load(qkv_ptr + kv_offs + H, mask=kv_ok, other=0.0)
    v = tl.load(qkv_ptr + kv_offs + 2 * H, mask=kv_ok, other=0.0)
    return k, v, kv_ok


# first: no spills under Triton 3.6 and newer for D <= 64, with dropout or not (kernels/COMPILE_CHECK.md)
@triton.autotune(configs=autotune_configs(_MN, [(64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2),
                                                (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (128, 64, 8, 2)],
                                          (16, 32)), **_ATTN_TUNING)
@triton.jit
def _attn_bwd_kernel(
    do_ptr, qkv_ptr, out_ptr, lse_ptr, mbits_ptr, dqkv_ptr, L, H, HEADS, D, sm_scale, qk_scale, smb, WPR,
    seed_ptr, p_drop,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HEADS
    h = bh % HEADS
    row = (b * L).to(tl.int64)
    stride = 3 * H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    lse_base = lse_ptr + bh.to(tl.int64) * L
    if DROPOUT:
        seed = tl.load(seed_ptr)
    # dK, dV: one key block at a time, over the query blocks that can see it
    for j0 in range(0, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        k, v, kv_ok = _key_rows(qkv_ptr, row, j, stride, H, h, D, d, d_ok, L)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        start = 0
        if CAUSAL:
            start = (j0 // BLOCK_M) * BLOCK_M
        for i0 in range(start, L, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
            q, do, delta, lse, q_ok = _query_rows(qkv_ptr, do_ptr, out_ptr, lse_base, row, i, stride, H, h, D, d,
                                                  d_ok, L)
            p = _probs(q, k, lse, b, i, j0, L, mbits_ptr, smb, WPR, qk_scale, HAS_MASK, CAUSAL, BLOCK_M, BLOCK_N)
            dp = dot_exact(do, tl.trans(v))
            pd = p
            if DROPOUT:
                keep = _keep(seed, bh, i, j, L, p_drop)
                pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
                dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
            dv += dot_exact(tl.trans(pd.to(do.dtype)), do)
            ds = p * (dp - delta[:, None])
            dk += dot_exact(tl.trans(ds.to(q.dtype)), q)
        dst = dqkv_ptr + (row + j)[:, None] * stride + h * D + d[None, :]
        tl.store(dst + H, (dk * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(dst + 2 * H, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_ok)
    # dQ: one query block at a time, over the keys it sees
    for i0 in range(0, L, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        q, do, delta, lse, q_ok = _query_rows(qkv_ptr, do_ptr, out_ptr, lse_base, row, i, stride, H, h, D, d, d_ok, L)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, i0 + BLOCK_M)
        for j0 in range(0, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            k, v, kv_ok = _key_rows(qkv_ptr, row, j, stride, H, h, D, d, d_ok, L)
            p = _probs(q, k, lse, b, i, j0, L, mbits_ptr, smb, WPR, qk_scale, HAS_MASK, CAUSAL, BLOCK_M, BLOCK_N)
            dp = dot_exact(do, tl.trans(v))
            if DROPOUT:
                dp = tl.where(_keep(seed, bh, i, j, L, p_drop), dp / (1.0 - p_drop), 0.0)
            ds = p * (dp - delta[:, None])
            dq += dot_exact(ds.to(k.dtype), k)
        tl.store(dqkv_ptr + (row + i)[:, None] * stride + h * D + d[None, :],
                 (dq * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=q_ok)


@triton.autotune(configs=autotune_configs(("BLOCK_K",), [(32, 4, 2), (64, 4, 2), (32, 8, 2), (64, 8, 2)], (32,)),
                 key=["L", "H", "HEADS", "T", "HAS_MASK", "CAUSAL", "HAS_BIAS", "ALIGNED", "TF32"])
@triton.jit
def _qkv_attn_kernel(
    x_ptr, w_ptr, m_ptr, b_ptr, soffs_ptr, mbits_ptr, out_ptr, L, H, HEADS, D, W_WORDS, T, qk_scale, smb, WPR,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, ALIGNED: tl.constexpr,
    TF32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HEADS
    h = bh % HEADS
    ti = tl.arange(0, BLOCK_T)
    ends = tl.load(soffs_ptr + ti + 1, mask=ti < T, other=2147483647)
    t = tl.sum((ends <= b).to(tl.int32), axis=0)  # the task whose segment holds sequence b
    mw = m_ptr + t * W_WORDS
    i = tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    i_ok = i < L
    d_ok = d < D
    rows = (b * L).to(tl.int64) + i
    q = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    k = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    v = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    C = 3 * H
    for k0 in range(0, H, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * H + kc[None, :], mask=i_ok[:, None] & (kc < H)[None, :], other=0.0)
        q = dot_acc(x, masked_weight_tile(w_ptr, mw, k0, h * D, H, C, H, True, ALIGNED, BLOCK_K, BLOCK_D), q, TF32)
        k = dot_acc(x, masked_weight_tile(w_ptr, mw, k0, H + h * D, H, C, H, True, ALIGNED, BLOCK_K, BLOCK_D), k,
                    TF32)
        v = dot_acc(x, masked_weight_tile(w_ptr, mw, k0, 2 * H + h * D, H, C, H, True, ALIGNED, BLOCK_K, BLOCK_D),
                    v, TF32)
    if HAS_BIAS:
        q += tl.load(b_ptr + h * D + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        k += tl.load(b_ptr + H + h * D + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        v += tl.load(b_ptr + 2 * H + h * D + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    # a power-of-two block wider than the head picked up the next head's rows: drop them; round like the
    # unfused path, which stores qkv in the input dtype
    dt = x_ptr.dtype.element_ty
    q = tl.where(d_ok[None, :], q, 0.0).to(dt)
    k = tl.where(d_ok[None, :], k, 0.0).to(dt)
    v = tl.where(d_ok[None, :], v, 0.0).to(dt)
    s = dot_exact(q, tl.trans(k)) * qk_scale
    ok = _allowed(b, i, 0, L, mbits_ptr, smb, WPR, HAS_MASK, CAUSAL, BLOCK_L, BLOCK_L)
    s = tl.where(ok, s, float("-inf"))
    m = tl.max(s, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, axis=1)
    o = dot_exact(p.to(dt), v) / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * H + h * D + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=i_ok[:, None] & d_ok[None, :])


@triton.jit
def _keep_mask_kernel(out_ptr, seed_ptr, L, p_drop, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    for j0 in range(0, L, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        keep = _keep(seed, bh, i, j, L, p_drop)
        ok = (i < L)[:, None] & (j < L)[None, :]
        tl.store(out_ptr + (bh.to(tl.int64) * L + i[:, None]) * L + j[None, :], keep.to(tl.int8), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
def pack_attention_mask(mask3: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bool [B, L, L] (a batch broadcast with stride 0 stays one mask) -> int32 words [B' in (1, B), L, ceil(L/32)],
    bit j of word w of row i = key 32w + j: the form the kernels read."""
    if mask3 is None:
        return None
    from harmodt_fast.ops.packing import pack_masks, pack_masks_torch

    m = mask3[:1] if mask3.shape[0] > 1 and mask3.stride(0) == 0 else mask3
    nb, L = m.shape[0], m.shape[-1]
    # under torch.compile the torch packing, which traces (the cpp one is opaque to dynamo and breaks the graph)
    pack = pack_masks_torch if torch.compiler.is_compiling() else pack_masks
    return pack(m.reshape(nb * L, L).contiguous()).view(nb, L, -1)


def _mask_args(mbits, L, dummy):
    """(mask pointer, batch stride in words, words per row, HAS_MASK); `dummy` stands in for no mask."""
    if mbits is None:
        return dummy, 0, 1, False
    wpr = mbits.shape[-1]
    return mbits.contiguous(), (0 if mbits.shape[0] == 1 else L * wpr), wpr, True


def _check_heads(H: int, heads: int) -> int:
    if heads < 1 or H % heads:
        raise ValueError(f"masked_attention: hidden {H} is not a multiple of heads {heads}")
    return H // heads


def seed_tensor(seed, device) -> torch.Tensor:
    """The dropout seed as the kernels read it, a 1-element int64 tensor on `device`: a tensor as given, an int
    converted, None a fresh draw made on the device (no host synchronisation, safe inside a CUDA graph). Not an int
    argument: Triton would specialise it (recompiling for 1 and multiples of 16) and a CUDA graph would bake it in."""
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    return torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)


def _seed_arg(seed, dropout_p, dummy):
    assert seed is not None or dropout_p == 0, "attention dropout needs a seed tensor"
    return seed if dropout_p > 0 else dummy


def attention_fwd_grid(meta, batch_heads: int, L: int) -> tuple:
    """(sequence x head, query block): the many sequence-heads on grid axis 0 (up to 2**31 - 1 programs; axes 1
    and 2 stop at 65535 on CUDA, which 160 tasks x 32 sequences x 16 heads would pass)."""
    return batch_heads, triton.cdiv(L, meta["BLOCK_M"])


def launch_attention_fwd(qkv, mbits, B, L, heads, causal, dropout_p, seed):
    H = qkv.shape[1] // 3
    D = _check_heads(H, heads)
    out = new_output((B * L, H), qkv.dtype, qkv.device)
    lse = new_output((B * heads, L), torch.float32, qkv.device)
    if B * L == 0:
        return out, lse
    mptr, smb, wpr, has_mask = _mask_args(mbits, L, qkv)
    _attn_fwd_kernel[lambda meta: attention_fwd_grid(meta, B * heads, L)](
        qkv, mptr, out, lse, L, H, heads, D, LOG2E / math.sqrt(D), smb, wpr, _seed_arg(seed, dropout_p, qkv),
        float(dropout_p), HAS_MASK=has_mask, CAUSAL=causal, DROPOUT=dropout_p > 0, BLOCK_D=max(16, next_pow2(D)),
    )
    return out, lse


def launch_attention_bwd(dout, qkv, out, lse, mbits, B, L, heads, causal, dropout_p, seed):
    H = qkv.shape[1] // 3
    D = _check_heads(H, heads)
    dqkv = new_output(qkv.shape, qkv.dtype, qkv.device)
    if B * L == 0:
        return dqkv
    mptr, smb, wpr, has_mask = _mask_args(mbits, L, qkv)
    _attn_bwd_kernel[(B * heads,)](
        dout, qkv, out, lse, mptr, dqkv, L, H, heads, D, 1.0 / math.sqrt(D), LOG2E / math.sqrt(D), smb, wpr,
        _seed_arg(seed, dropout_p, qkv), float(dropout_p), HAS_MASK=has_mask, CAUSAL=causal, DROPOUT=dropout_p > 0,
        BLOCK_D=max(16, next_pow2(D)),
    )
    return dqkv


def launch_qkv_attention(x2d, weight, bias, masks, seq_offs, mbits, B, L, heads, causal):
    H = x2d.shape[1]
    D = _check_heads(H, heads)
    out = new_output((B * L, H), x2d.dtype, x2d.device)
    if B * L == 0:
        return out
    T = seq_offs.numel() - 1
    mptr, smb, wpr, has_mask = _mask_args(mbits, L, x2d)
    _qkv_attn_kernel[(B * heads,)](
        x2d, weight, masks, bias if bias is not None else x2d, seq_offs, mptr, out, L, H, heads, D, masks.shape[1],
        T, LOG2E / math.sqrt(D), smb, wpr, HAS_BIAS=bias is not None, HAS_MASK=has_mask, CAUSAL=causal,
        ALIGNED=H % 32 == 0, TF32=allow_tf32(x2d.dtype), BLOCK_T=max(16, next_pow2(T)),
        BLOCK_L=max(32, next_pow2(L)), BLOCK_D=max(16, next_pow2(D)),
    )
    return out


def dropout_keep_mask(seed, batch: int, heads: int, L: int, p: float, device="cpu") -> torch.Tensor:
    """The keep-mask [B, heads, L, L] (bool) that the kernels draw for `seed` (int or seed tensor) and dropout p."""
    out = new_output((batch * heads, L, L), torch.int8, device)
    if out.numel():
        _keep_mask_kernel[attention_fwd_grid({"BLOCK_M": KEEP_BLOCK}, batch * heads, L)](
            out, seed_tensor(seed, device), L, float(p), BLOCK=KEEP_BLOCK)
    return out.view(batch, heads, L, L).bool()


# ---------------------------------------------------------------------------------------------------------------
# torch.library ops; `mbits` is the bit-packed attention mask from pack_attention_mask (or None), `seed` the
# dropout seed tensor (None without dropout)

@torch.library.custom_op("harmodt_fast::attention_fwd", mutates_args=())
def attention_fwd_op(qkv: torch.Tensor, mbits: Optional[torch.Tensor], B: int, L: int, heads: int, causal: bool,
                     dropout_p: float, seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_attention_fwd(qkv.contiguous(), mbits, B, L, heads, causal, dropout_p, seed)


@attention_fwd_op.register_fake
def _(qkv, mbits, B, L, heads, causal, dropout_p, seed):
    H = qkv.shape[1] // 3
    return qkv.new_empty(B * L, H), qkv.new_empty(B * heads, L, dtype=torch.float32)


@torch.library.custom_op("harmodt_fast::attention_bwd", mutates_args=())
def attention_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     mbits: Optional[torch.Tensor], B: int, L: int, heads: int, causal: bool, dropout_p: float,
                     seed: Optional[torch.Tensor]) -> torch.Tensor:
    return launch_attention_bwd(dout.contiguous(), qkv.contiguous(), out.contiguous(), lse.contiguous(), mbits, B,
                                L, heads, causal, dropout_p, seed)


@attention_bwd_op.register_fake
def _(dout, qkv, out, lse, mbits, B, L, heads, causal, dropout_p, seed):
    return torch.empty_like(qkv)


@torch.library.custom_op("harmodt_fast::masked_qkv_attention", mutates_args=())
def masked_qkv_attention_op(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            masks: torch.Tensor, seq_offsets: Sequence[int], mbits: Optional[torch.Tensor], B: int,
                            L: int, heads: int, causal: bool) -> torch.Tensor:
    return launch_qkv_attention(x2d.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
                                masks.contiguous(), device_offsets(seq_offsets, x2d.device), mbits, B, L, heads,
                                causal)


@masked_qkv_attention_op.register_fake
def _(x2d, weight, bias, masks, seq_offsets, mbits, B, L, heads, causal):
    return torch.empty_like(x2d)


class MaskedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3d, weight, bias, masks, seq_offsets, heads, mbits, causal, dropout_p, seed, task_grads):
        B, L, H = x3d.shape
        x2d = x3d.reshape(B * L, H)
        row_offs = [o * L for o in seq_offsets]
        qkv, _ = masked_mm_op(x2d, weight, masks, row_offs, bias, None, True, EPI_NONE, 0, False)
        out, lse = attention_fwd_op(qkv, mbits, B, L, heads, causal, dropout_p, seed)
        ctx.save_for_backward(x2d, weight, masks, qkv, out, lse, mbits, seed)
        # task grads are an output accumulated in place (often a view of one buffer that other layers' backward
        # also writes), not an input: kept on ctx, outside save_for_backward's version check
        ctx.task_grads = task_grads
        ctx.meta = (B, L, heads, causal, dropout_p, row_offs, bias is not None)
        return out.view(B, L, H)

    @staticmethod
    def backward(ctx, dout):
        x2d, weight, masks, qkv, out, lse, mbits, seed = ctx.saved_tensors
        task_grads = ctx.task_grads
        B, L, heads, causal, dropout_p, row_offs, has_bias = ctx.meta
        need = ctx.needs_input_grad
        dqkv = attention_bwd_op(dout.reshape(B * L, -1), qkv, out, lse, mbits, B, L, heads, causal, dropout_p, seed)
        dx = dw = db = None
        if need[0]:
            dx = masked_mm_op(dqkv, weight, masks, row_offs, None, None, False, EPI_NONE, 0, False)[0].view(B, L, -1)
        if need[1] or (has_bias and need[2]) or task_grads is not None:
            dw, db = masked_dw_op(dqkv, x2d, masks, row_offs, task_grads, need[1], has_bias and need[2], weight.dtype)
            dw = dw if need[1] else None
            db = db if has_bias and need[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None


def masked_attention_triton(x3d, weight, bias, masks_packed, seq_offsets, heads, mask3=None, causal=False,
                            dropout_p=0.0, task_grads=None, seed=None, mbits=None):
    """The "triton" backend of hf.ops.masked_attention (arguments already checked): x3d [B, L, H], seq_offsets
    host ints over B, mask3 None or a bool [B, L, L] view, mbits its packed form when the caller has it already,
    seed (with dropout) a seed tensor, an int, or None for a fresh draw. Returns [B, L, H]."""
    B, L, H = x3d.shape
    seed = seed_tensor(seed, x3d.device) if dropout_p > 0 else None
    mbits = pack_attention_mask(mask3) if mbits is None else mbits
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x3d, weight, bias)):
        return MaskedAttentionFn.apply(x3d, weight, bias, masks_packed, tuple(seq_offsets), heads, mbits, causal,
                                       float(dropout_p), seed, task_grads)
    x2d = x3d.reshape(B * L, H)
    if dropout_p == 0 and L <= FUSED_MAX_L:
        out = masked_qkv_attention_op(x2d, weight, bias, masks_packed, list(seq_offsets), mbits, B, L, heads, causal)
    else:
        qkv, _ = masked_mm_op(x2d, weight, masks_packed, [o * L for o in seq_offsets], bias, None, True, EPI_NONE,
                              0, False)
        out, _ = attention_fwd_op(qkv, mbits, B, L, heads, causal, float(dropout_p), seed)
    return out.view(B, L, H)
