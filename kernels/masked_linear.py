"""Task-masked matmuls: y = x·(W ⊙ M_t)ᵀ + b for every task segment in one launch, and its backward.

Three kernels, each registered as a `torch.library` custom op (opaque to torch.compile, with a fake impl):
- `masked_mm`: Out[m, c] = Σ_r A[m, r]·V(r, c) for the rows m of each task t, where V is the view of W ⊙ M_t
  as Wᵀ (forward) or W (dX = dY·(W ⊙ M_t)). Optional epilogue: + bias, then ReLU/GELU (storing the
  pre-activation when the backward needs it), or × act'(aux) (the activation's backward, for a fused MLP).
- `masked_dw`: dW = Σ_t M_t ⊙ (dY_tᵀ X_t) and db = Σ dY in one kernel that walks the task segments; with a
  `task_grads` buffer it also adds each task's dense dY_tᵀ X_t into task_grads[t] in the same pass, so a mask
  update needs one backward, not one per task.
The autograd glue (`MaskedLinearFn`) and the backend entry point `masked_linear_triton` sit at the end.

Rows of a task come from the task-segment offsets (see _common.task_tile). The mask is expanded from its packed
bits in registers; W ⊙ M_t is never written to memory. Accumulation is fp32 for every input dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from harmodt_fast.kernels._common import (
    ACT_NONE,
    allow_tf32,
    autotune_configs,
    check_rows_fit,
    device_offsets,
    dot_acc,
    activation,
    activation_grad,
    interpret,
    m_bucket,
    mask_bits,
    masked_weight_tile,
    new_output,
    next_pow2,
    num_sms,
    task_tile,
    task_tile_grid,
)

EPI_NONE, EPI_ACT, EPI_ACT_GRAD = 0, 1, 2


def _mm_configs():
    shapes = [  # (BLOCK_M, BLOCK_R, BLOCK_C, SWAP, warps, stages)
        (128, 64, 128, True, 8, 3), (128, 64, 64, True, 4, 4), (64, 64, 128, True, 4, 4), (128, 64, 256, True, 8, 3),
        (64, 32, 64, True, 4, 4), (256, 64, 128, True, 8, 3),
        (128, 64, 128, False, 8, 3), (128, 64, 256, False, 8, 3), (64, 64, 256, False, 8, 3), (64, 32, 64, False, 4, 4),
    ]
    # the interpreter's blocks are small so tests cross tiles; BLOCK_R 64 / BLOCK_C 32 take the two forms of the
    # word expansion (several words per weight column in the forward, one per row in dX). Tests swap in the
    # SWAP=True config themselves.
    return autotune_configs(("BLOCK_M", "BLOCK_R", "BLOCK_C", "SWAP"), shapes, (16, 64, 32, False))


def _prune_mm(configs, named_args, **kwargs):
    c_max = max(32, next_pow2(named_args["C"]))
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= c_max]
    return kept or configs[:1]


# every constexpr that changes the compiled code is in the key (else one variant's tuning is reused for another)
@triton.autotune(configs=_mm_configs(),
                 key=["R", "C", "M_BUCKET", "T", "CONTIG_R", "EPI", "ACT", "HAS_BIAS", "STORE_PRE", "ALIGNED", "TF32"],
                 prune_configs_by={"early_config_prune": _prune_mm})
@triton.jit
def _masked_mm_kernel(
    a_ptr, w_ptr, m_ptr, offs_ptr, bias_ptr, aux_ptr, out_ptr, pre_ptr,
    M, R, C, LD, W_WORDS, T, M_BUCKET,
    CONTIG_R: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
    ACT: tl.constexpr, STORE_PRE: tl.constexpr, TF32: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SWAP: tl.constexpr,
):
    # column tiles vary fastest, so programs running together share one A row tile (read once from DRAM);
    # W and all the packed masks are small enough to stay in L2.
    # SWAP computes the transposed tile, Outᵀ = Vᵀ·Aᵀ: the masked weight (built in registers) is then the
    # left operand, which Hopper's wgmma reads from registers, instead of a trip through shared memory.
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % n_c
    t, row0, row_end = task_tile(pid // n_c, offs_ptr, T, BLOCK_T, BLOCK_M)
    if t < T:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        c0 = pid_c * BLOCK_C
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mw_ptr = m_ptr + t * W_WORDS
        if SWAP:
            acc_t = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                a_t = tl.load(a_ptr + rows64[None, :] * R + rr[:, None], mask=row_ok[None, :] & (rr < R)[:, None],
                              other=0.0)
                w_t = masked_weight_tile(w_ptr, mw_ptr, c0, r0, C, R, LD, not CONTIG_R, ALIGNED, BLOCK_C, BLOCK_R)
                acc_t = dot_acc(w_t, a_t, acc_t, TF32)
            acc = tl.trans(acc_t)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                a = tl.load(a_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr < R)[None, :],
                            other=0.0)
                w = masked_weight_tile(w_ptr, mw_ptr, r0, c0, R, C, LD, CONTIG_R, ALIGNED, BLOCK_R, BLOCK_C)
                acc = dot_acc(a, w, acc, TF32)
        ok = row_ok[:, None] & col_ok[None, :]
        out_offs = rows64[:, None] * C + cols[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if EPI == 1:
            if STORE_PRE:
                tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=ok)
            acc = activation(acc, ACT)
        elif EPI == 2:
            aux = tl.load(aux_ptr + out_offs, mask=ok, other=0.0)
            acc = acc * activation_grad(aux, ACT)
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=autotune_configs(("BLOCK_M",), [(64, 8, 3), (32, 8, 4), (128, 8, 3), (64, 4, 3)], (16,)),
                 key=["N", "K", "M_BUCKET", "T", "BLOCK_N", "BLOCK_K", "TASK_SPLIT", "HAS_TG", "HAS_DW", "HAS_DB",
                      "ALIGNED", "TF32"],
                 restore_value=["tg_ptr"])
@triton.jit
def _masked_dw_kernel(
    dy_ptr, x_ptr, m_ptr, offs_ptr, dw_ptr, db_ptr, tg_ptr,
    M, N, K, W_WORDS, T, ROWS_PER_SPLIT, TASKS_PER_SPLIT, M_BUCKET, TG_STRIDE,
    TASK_SPLIT: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, HAS_TG: tl.constexpr,
    ALIGNED: tl.constexpr, TF32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # one program: one [BLOCK_N, BLOCK_K] tile of dW, over one split of the rows. Splits are row ranges (any task
    # boundaries inside are walked), or, with TASK_SPLIT, whole groups of tasks so that each task's dense gradient
    # is summed by exactly one program and can be added into task_grads without atomics.
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n_k = tl.cdiv(K, BLOCK_K)
    n0 = (pid // n_k) * BLOCK_N
    k0 = (pid % n_k) * BLOCK_K
    ns = n0 + tl.arange(0, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    if TASK_SPLIT:
        t_lo = s * TASKS_PER_SPLIT
        t_hi = tl.minimum(T, t_lo + TASKS_PER_SPLIT)
        r_lo = 0
        r_hi = M
    else:
        t_lo = 0
        t_hi = T
        r_lo = s * ROWS_PER_SPLIT
        r_hi = tl.minimum(M, r_lo + ROWS_PER_SPLIT)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        lo = tl.maximum(tl.load(offs_ptr + t), r_lo)
        hi = tl.minimum(tl.load(offs_ptr + t + 1), r_hi)
        if hi > lo:
            g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for m0 in range(lo, hi, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                r_ok = rows < hi
                rows64 = rows.to(tl.int64)
                dyt = tl.load(dy_ptr + rows64[None, :] * N + ns[:, None], mask=n_ok[:, None] & r_ok[None, :],
                              other=0.0)
                x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=r_ok[:, None] & k_ok[None, :],
                            other=0.0)
                g = dot_acc(dyt, x, g, TF32)
                if HAS_DB:
                    db += tl.sum(dyt.to(tl.float32), axis=1)
            if HAS_DW:
                bits = mask_bits(m_ptr + t * W_WORDS, n0, k0, N, K, K, False, ALIGNED, BLOCK_N, BLOCK_K)
                acc += tl.where(bits != 0, g, 0.0)
            if HAS_TG:
                tg_offs = tl.cast(t, tl.int64) * TG_STRIDE + ns[:, None] * K + ks[None, :]
                ok = n_ok[:, None] & k_ok[None, :]
                prev = tl.load(tg_ptr + tg_offs, mask=ok, other=0.0)
                tl.store(tg_ptr + tg_offs, prev + g, mask=ok)
    if HAS_DW:
        dw_offs = s.to(tl.int64) * N * K + ns[:, None] * K + ks[None, :]
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_DB:
        if k0 == 0:
            tl.store(db_ptr + s * N + ns, db.to(db_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------------------------------------------
# launchers (plain functions on contiguous tensors; the custom ops below wrap them)

def launch_masked_mm(a, weight, masks, offs, transpose_w: bool, bias=None, epilogue=EPI_NONE, act=ACT_NONE,
                     aux=None, store_pre=False):
    """Out = A·V for each task's rows, V = (W ⊙ M_t)ᵀ (transpose_w, the forward) or W ⊙ M_t (dX).

    `offs`: int32 device offsets over the rows of `a`. Returns (out, pre) with `pre` the pre-activation when
    store_pre (else None). Output rows outside every segment do not exist: offsets cover all rows."""
    M = a.shape[0]
    out_f, in_f = weight.shape
    R, C = (in_f, out_f) if transpose_w else (out_f, in_f)
    if a.shape[1] != R:
        raise ValueError(f"masked_mm: A has {a.shape[1]} columns, the weight view needs {R}")
    check_rows_fit(M, max(R, C))
    out = new_output((M, C), a.dtype, a.device)
    pre = new_output((M, C), a.dtype, a.device) if store_pre else None
    T = offs.numel() - 1
    if M == 0 or C == 0:
        return out, pre
    if R == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return out, pre
    contig_r = transpose_w
    bit_axis_len = in_f  # the weight's row length: bits of one weight row are consecutive
    aligned = bit_axis_len % 32 == 0
    dummy = out
    _masked_mm_kernel[lambda meta: task_tile_grid(M, T, meta["BLOCK_M"], triton.cdiv(C, meta["BLOCK_C"]))](
        a, weight, masks, offs,
        bias if bias is not None else dummy, aux if aux is not None else dummy, out,
        pre if pre is not None else dummy,
        M, R, C, in_f, masks.shape[1], T, m_bucket(M),
        CONTIG_R=contig_r, ALIGNED=aligned, HAS_BIAS=bias is not None, EPI=epilogue, ACT=act,
        STORE_PRE=store_pre, TF32=allow_tf32(a.dtype), BLOCK_T=max(16, next_pow2(T)),
    )
    return out, pre


def _dw_tile(n: int, k: int, task_grads: bool) -> tuple[int, int]:
    if interpret():
        return 32, 64
    # with task grads the program also holds the task's dense tile and its task_grads tile: 128x128 spills
    return (128, 128) if n * k >= (1 << 20) and not task_grads else (64, 64)


def dw_schedule(M: int, N: int, K: int, T: int, task_grads: bool, sms: int) -> tuple:
    """((dW tiles, splits): the grid, BLOCK_N, BLOCK_K, rows per split, tasks per split). The splits (grid axis 1,
    at most 65535 on CUDA) stay under 2 * sms: enough programs to fill the GPU, whatever M and T."""
    bn, bk = _dw_tile(N, K, task_grads)
    tiles = triton.cdiv(N, bn) * triton.cdiv(K, bk)
    want = max(1, triton.cdiv(2 * sms, tiles))
    if task_grads:
        tps = triton.cdiv(T, min(want, T))
        splits, rps = triton.cdiv(T, tps), M
    else:
        # a split of fewer rows than this costs more in partial sums than it gains in parallelism (the
        # interpreter uses tiny splits so that small test shapes still cross split and segment boundaries)
        min_rows = 16 if interpret() else 256
        splits = min(want, max(1, M // min_rows))
        rps = triton.cdiv(triton.cdiv(M, splits), min_rows // 2) * (min_rows // 2)
        splits, tps = triton.cdiv(M, rps), T
    return (tiles, splits), bn, bk, rps, tps


def launch_masked_dw(dy, x, masks, offs, weight_dtype, need_dw=True, need_db=False, task_grads=None):
    """(dW, db) = (Σ_t M_t ⊙ dY_tᵀX_t, Σ dY); adds dY_tᵀX_t into task_grads[t] when given. None for what is
    not asked. task_grads [T, N, K] may have any task stride (a layer's slice of one [T, P] buffer) as long as
    each task_grads[t] is row-major contiguous."""
    M, N = dy.shape
    K = x.shape[1]
    T = offs.numel() - 1
    dev = dy.device
    if M == 0 or not (need_dw or need_db or task_grads is not None):
        dw = torch.zeros(N, K, dtype=weight_dtype, device=dev) if need_dw else None
        db = torch.zeros(N, dtype=weight_dtype, device=dev) if need_db else None
        return dw, db
    check_rows_fit(M, max(N, K))
    grid, bn, bk, rps, tps = dw_schedule(M, N, K, T, task_grads is not None, num_sms(dev))
    splits = grid[1]
    direct = splits == 1
    dw = db = None
    if need_dw:
        dw = new_output((N, K), weight_dtype, dev) if direct else \
            new_output((splits, N, K), torch.float32, dev)
    if need_db:
        db = new_output((N,), weight_dtype, dev) if direct else \
            new_output((splits, N), torch.float32, dev)
    dummy = dy
    _masked_dw_kernel[grid](
        dy, x, masks, offs, dw if dw is not None else dummy, db if db is not None else dummy,
        task_grads if task_grads is not None else dummy,
        M, N, K, masks.shape[1], T, rps, tps, m_bucket(M),
        task_grads.stride(0) if task_grads is not None else 0,
        TASK_SPLIT=task_grads is not None, HAS_DW=need_dw, HAS_DB=need_db, HAS_TG=task_grads is not None,
        ALIGNED=K % 32 == 0, TF32=allow_tf32(dy.dtype), BLOCK_N=bn, BLOCK_K=bk,
    )
    if not direct:
        dw = dw.sum(0).to(weight_dtype) if dw is not None else None
        db = db.sum(0).to(weight_dtype) if db is not None else None
    return dw, db


def task_rows_contiguous(task_grads: torch.Tensor) -> bool:
    """Whether every task_grads[t] ([N, K]) is row-major contiguous; the task stride itself is free."""
    _, n, k = task_grads.shape
    return (k <= 1 or task_grads.stride(2) == 1) and (n <= 1 or task_grads.stride(1) == k)


# ---------------------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (traced through their fake impls), eager calls run the kernels

def _empty(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(0)


@torch.library.custom_op("harmodt_fast::masked_mm", mutates_args=())
def masked_mm_op(a: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor, offsets: Sequence[int],
                 bias: Optional[torch.Tensor], aux: Optional[torch.Tensor], transpose_w: bool, epilogue: int,
                 act: int, store_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    offs = device_offsets(offsets, a.device)
    out, pre = launch_masked_mm(a.contiguous(), weight.contiguous(), masks.contiguous(), offs, transpose_w,
                                bias=bias.contiguous() if bias is not None else None, epilogue=epilogue, act=act,
                                aux=aux.contiguous() if aux is not None else None, store_pre=store_pre)
    return out, (pre if pre is not None else _empty(a))


@masked_mm_op.register_fake
def _(a, weight, masks, offsets, bias, aux, transpose_w, epilogue, act, store_pre):
    c = weight.shape[0] if transpose_w else weight.shape[1]
    out = a.new_empty(a.shape[0], c)
    return out, (a.new_empty(a.shape[0], c) if store_pre else a.new_empty(0))


@torch.library.custom_op("harmodt_fast::masked_dw", mutates_args=("task_grads",))
def masked_dw_op(dy: torch.Tensor, x: torch.Tensor, masks: torch.Tensor, offsets: Sequence[int],
                 task_grads: Optional[torch.Tensor], need_dw: bool, need_db: bool,
                 weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    offs = device_offsets(offsets, dy.device)
    if task_grads is not None and not task_rows_contiguous(task_grads):
        # accumulated in place, so a copy would lose the sums; a [T, P] buffer's column slice is fine
        raise ValueError(f"masked_dw: each task_grads[t] must be row-major contiguous, got strides "
                         f"{task_grads.stride()} for shape {tuple(task_grads.shape)}")
    dw, db = launch_masked_dw(dy.contiguous(), x.contiguous(), masks.contiguous(), offs, weight_dtype,
                              need_dw=need_dw, need_db=need_db, task_grads=task_grads)
    return (dw if dw is not None else dy.new_empty(0, dtype=weight_dtype),
            db if db is not None else dy.new_empty(0, dtype=weight_dtype))


@masked_dw_op.register_fake
def _(dy, x, masks, offsets, task_grads, need_dw, need_db, weight_dtype):
    n, k = dy.shape[1], x.shape[1]
    return (dy.new_empty((n, k) if need_dw else (0,), dtype=weight_dtype),
            dy.new_empty((n,) if need_db else (0,), dtype=weight_dtype))


class MaskedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, masks, row_offsets, task_grads):
        y, _ = masked_mm_op(x2d, weight, masks, list(row_offsets), bias, None, True, EPI_NONE, ACT_NONE, False)
        ctx.save_for_backward(x2d, weight, masks)
        # task grads are an output accumulated in place (often a view of one buffer that other layers' backward
        # also writes), not an input: kept on ctx, outside save_for_backward's version check
        ctx.task_grads = task_grads
        ctx.row_offsets = list(row_offsets)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, masks = ctx.saved_tensors
        task_grads = ctx.task_grads
        offs = ctx.row_offsets
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx, _ = masked_mm_op(dy, weight, masks, offs, None, None, False, EPI_NONE, ACT_NONE, False)
        need_dw = ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        if need_dw or need_db or task_grads is not None:
            dw, db = masked_dw_op(dy, x2d, masks, offs, task_grads, need_dw, need_db, weight.dtype)
            dw = dw if need_dw else None
            db = db if need_db else None
        return dx, dw, db, None, None, None


def masked_linear_triton(x2d, weight, bias, masks_packed, row_offsets, task_grads=None):
    """The "triton" backend of hf.ops.masked_linear (arguments already checked; row_offsets: host ints)."""
    return MaskedLinearFn.apply(x2d, weight, bias, masks_packed, tuple(row_offsets), task_grads)
