"""Pieces shared by the task-masked kernels: the (task, row-tile) schedule, the in-register mask expansion,
the activations, and small host helpers.

Schedule. Rows are grouped into contiguous task segments, given as an int32 device array `offsets[T+1]`.
A kernel over row tiles launches `cdiv(M, BLOCK_M) + T` programs (an upper bound for any BLOCK_M, because each
segment wastes at most one partial tile); program p finds its task from the running count of tiles per segment,
computed in the program itself from `offsets`. Empty segments own no tile, programs past the last tile return at
once. The schedule never depends on host-side tables, so autotuning over BLOCK_M needs nothing rebuilt, and the
Triton interpreter (which cannot follow pointer tables) runs it as is.

Masks. Task t's mask is int32 words `masks[t, :]`, flat over the row-major weight: bit j of word w is weight
element 32w + j. A weight tile is loaded in a "view" (r, c) whose flat index is c*LD + r (CONTIG_R: the bits run
along r) or r*LD + c. When LD % 32 == 0 and the block along the bit axis is a multiple of 32, a tile's bits are
whole words: the kernel loads BR*BC/32 words and expands them with shifts (ALIGNED). Otherwise every element
fetches its own word (correct for any shape, slower).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACT_NONE, ACT_RELU, ACT_GELU = 0, 1, 2
ACTIVATIONS = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU}


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuned(configs: list) -> list:
    """A kernel's autotune configs, or only its first (the default) when HARMODT_FAST_AUTOTUNE=0 (read when the
    kernels are imported): one compile per kernel variant instead of one per config, for a first GPU run that
    must check correctness in minutes."""
    return configs if os.environ.get("HARMODT_FAST_AUTOTUNE", "1") != "0" else configs[:1]


def autotune_configs(names: tuple, rows: list, interpreted: tuple) -> list:
    """triton.Configs from rows (values of the constexprs `names`..., num_warps, num_stages), through `tuned`, so
    rows[0] is the pinned default; under the interpreter one config of the small blocks `interpreted` (tests on
    small shapes still cross blocks)."""
    if interpret():
        return [triton.Config(dict(zip(names, interpreted)), num_warps=4)]
    return tuned([triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows])


def allow_tf32(dtype: torch.dtype) -> bool:
    """fp32 matmuls use TF32 only when torch itself would (float32_matmul_precision != "highest")."""
    return dtype == torch.float32 and not interpret() and torch.get_float32_matmul_precision() != "highest"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def m_bucket(m: int) -> int:
    """Row count rounded up to a power of two: the autotune key, so that nearby batch sizes share a tuning."""
    return next_pow2(max(1, m))


# Tests on a GPU set this (or HARMODT_POISON=1) so that every kernel output starts as NaN: an element a kernel
# forgets to write then shows up instead of passing with whatever the allocator left there.
POISON = os.environ.get("HARMODT_POISON") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for a kernel's output (NaN-filled while POISON is set)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


_OFFSETS_CACHE: dict = {}


def device_offsets(row_offsets, device: torch.device) -> torch.Tensor:
    """Host offsets -> int32 device tensor, cached: a model calls every layer with the same offsets."""
    key = (tuple(row_offsets), str(device))
    hit = _OFFSETS_CACHE.get(key)
    if hit is None:
        if len(_OFFSETS_CACHE) > 256:
            _OFFSETS_CACHE.clear()
        hit = torch.tensor(key[0], dtype=torch.int32, device=device)
        _OFFSETS_CACHE[key] = hit
    return hit


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a handful of programs keeps the split paths exercised on small shapes


def check_rows_fit(m: int, width: int) -> None:
    if m * max(width, 1) >= 2**31:
        raise ValueError(f"harmodt_fast kernels: {m} rows x {width} columns exceed 2**31 elements per tensor")


def task_tile_grid(M: int, T: int, block_m: int, col_tiles: int = 1) -> tuple:
    """The launch grid of a kernel over task row tiles (task_tile) times `col_tiles`: all on grid axis 0, which
    takes 2**31 - 1 programs (axes 1 and 2 stop at 65535 on CUDA)."""
    return (col_tiles * (triton.cdiv(M, block_m) + T),)


# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def task_tile(pid, offs_ptr, T, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """(task, first row, end of the task's rows) of row tile `pid`; task >= T means there is no such tile."""
    i = tl.arange(0, BLOCK_T)
    lo = tl.load(offs_ptr + i, mask=i < T, other=0)
    hi = tl.load(offs_ptr + i + 1, mask=i < T, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    incl = tl.cumsum(tiles, axis=0)
    t = tl.sum((incl <= pid).to(tl.int32), axis=0)
    first = tl.sum(tl.where(i == t, incl - tiles, 0), axis=0)
    seg_lo = tl.sum(tl.where(i == t, lo, 0), axis=0)
    seg_hi = tl.sum(tl.where(i == t, hi, 0), axis=0)
    return t, seg_lo + (pid - first) * BLOCK_M, seg_hi


@triton.jit
def mask_bits(mw_ptr, r0, c0, R, C, LD, CONTIG_R: tl.constexpr, ALIGNED: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr):
    """Mask bits (int32 0/1) of the tile rows r0..r0+BR, cols c0..c0+BC of the (r, c) weight view; mw_ptr points
    at the task's first word. Out-of-range elements read 0."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    if ALIGNED:
        sh = tl.arange(0, 32)
        if CONTIG_R:
            if BR == 32:  # one word per column: no size-1 axis
                words = tl.load(mw_ptr + c * (LD // 32) + r0 // 32, mask=c < C, other=0)  # r0 < R: callers' loops
                bits = (words[None, :] >> sh[:, None]) & 1
            else:
                rw = r0 // 32 + tl.arange(0, BR // 32)
                ok = ((rw * 32) < R)[:, None] & (c < C)[None, :]
                words = tl.load(mw_ptr + c[None, :] * (LD // 32) + rw[:, None], mask=ok, other=0)
                bits = (words[:, None, :] >> sh[None, :, None]) & 1
                bits = tl.reshape(bits, (BR, BC))
        else:
            if BC == 32:
                words = tl.load(mw_ptr + r * (LD // 32) + c0 // 32, mask=r < R, other=0)  # c0 < C: callers' tiles
                bits = (words[:, None] >> sh[None, :]) & 1
            else:
                cw = c0 // 32 + tl.arange(0, BC // 32)
                ok = (r < R)[:, None] & ((cw * 32) < C)[None, :]
                words = tl.load(mw_ptr + r[:, None] * (LD // 32) + cw[None, :], mask=ok, other=0)
                bits = (words[:, :, None] >> sh[None, None, :]) & 1
                bits = tl.reshape(bits, (BR, BC))
    else:
        ok = (r < R)[:, None] & (c < C)[None, :]
        if CONTIG_R:
            flat = c[None, :] * LD + r[:, None]
        else:
            flat = r[:, None] * LD + c[None, :]
        words = tl.load(mw_ptr + (flat >> 5), mask=ok, other=0)
        bits = (words >> (flat & 31)) & 1
    return bits


@triton.jit
def masked_weight_tile(w_ptr, mw_ptr, r0, c0, R, C, LD, CONTIG_R: tl.constexpr, ALIGNED: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr):
    """The (W ⊙ M_t) tile [BR, BC] of the (r, c) view, zero outside the weight; W ⊙ M_t never exists in memory."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    ok = (r < R)[:, None] & (c < C)[None, :]
    if CONTIG_R:
        w = tl.load(w_ptr + c[None, :] * LD + r[:, None], mask=ok, other=0.0)
    else:
        w = tl.load(w_ptr + r[:, None] * LD + c[None, :], mask=ok, other=0.0)
    bits = mask_bits(mw_ptr, r0, c0, R, C, LD, CONTIG_R, ALIGNED, BR, BC)
    return tl.where(bits != 0, w, tl.zeros_like(w))


@triton.jit
def dot_acc(a, b, acc, TF32: tl.constexpr):
    """acc + a·b with fp32 accumulation; fp32 operands use TF32 only when asked (else full precision)."""
    if a.dtype == tl.float32:
        if TF32:
            return tl.dot(a, b, acc, input_precision="tf32")
        else:
            return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_exact(a, b):
    """a·b in fp32; fp32 operands in full precision (attention scores and their gradients)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def activation(x, ACT: tl.constexpr):
    if ACT == 1:
        return tl.maximum(x, 0.0)
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        return x


@triton.jit
def activation_grad(aux, ACT: tl.constexpr):
    """d act / d pre. For ReLU `aux` may be the pre-activation or the output (both are > 0 at the same places);
    for GELU it must be the pre-activation."""
    if ACT == 1:
        return (aux > 0).to(tl.float32)
    elif ACT == 2:
        x = aux.to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    else:
        return tl.full(aux.shape, 1.0, tl.float32)
