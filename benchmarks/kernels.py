"""Task-masked kernels against the alternatives, side by side in one run on one GPU.

    python -m harmodt_fast.benchmarks.kernels --out benchmarks/results          # the full table (CUDA)
    python -m harmodt_fast.benchmarks.kernels --smoke --out /tmp/kb             # CPU: every code path once, tiny shapes

For each masked layer shape of the paper model on MT50 (50 tasks x 8 sequences x 75 tokens = 30,000 rows;
256->768, 256->256, 256->1024, 1024->256) and of the large preset (hidden 1024, MLP 4096), in bf16:
  ours (Triton, mask bits expanded in registers, all tasks in one launch)  |  the same matmul unmasked through
  cuBLAS (F.linear)  |  materialise W ⊙ M_t per task then matmul, eager and under torch.compile  |  torch's grouped
  matmul (torch._grouped_mm) over the materialised per-task weights, where the installed torch has it;
forward, dX, dW+db (and with per-task gradients). Then attention at DT sequence lengths (ours vs
scaled_dot_product_attention with the model's bool mask, and with is_causal as a reference point) and the MLP
block (fused chain vs two launches vs unmasked cuBLAS).

Times: `gpu_ms` is GPU time from a CUDA-graph replay (triton.testing.do_bench_cudagraph: no launch overhead),
`wall_ms` from triton.testing.do_bench (eager launches, what an uncaptured training step pays), both medians.
Every row carries its FLOPs, its minimum bytes and the floor max(FLOPs / matmul ceiling, bytes / copy ceiling),
with the ceilings measured on the same device (benchmarks/device_ceilings.py; `--ceilings` reads a record of
them, else they are measured at the start).
Results go to <out>/kernels_<device>_<date>.json and .md with the device, torch/triton/CUDA versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the kernels can only run in the interpreter here (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harmodt_fast as hf  # noqa: E402
from harmodt_fast.benchmarks import device_ceilings  # noqa: E402

CEILINGS: dict = {}  # measured on this run's device (main)

PAPER_LINEAR = [(256, 768), (256, 256), (256, 1024), (1024, 256)]
LARGE_LINEAR = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]


# ---------------------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, smoke: bool):
        self.smoke = smoke

    def __call__(self, fn, impl: str = "") -> dict:
        if self.smoke:
            t0 = time.perf_counter()
            fn()
            return {"wall_ms": (time.perf_counter() - t0) * 1e3, "gpu_ms": None}
        import triton.testing as tt

        fn()  # autotune, compile, caches, before any capture
        torch.cuda.synchronize()
        res = {"wall_ms": tt.do_bench(fn, warmup=25, rep=100, return_mode="median")}
        try:
            res["gpu_ms"] = tt.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001  (a path that cannot be captured keeps its wall time)
            res["gpu_ms"] = None
            res["graph_error"] = f"{type(e).__name__}: {e}"[:200]
        return res


def floor_ms(flops: float, nbytes: float, dtype) -> float:
    return device_ceilings.floor_ms(flops, nbytes, dtype, CEILINGS)


def mask_bytes(tasks: int, n_in: int, n_out: int) -> int:
    return tasks * ((n_in * n_out + 31) // 32) * 4


def offsets_for(tasks: int, rows: int) -> list[int]:
    return [t * rows for t in range(tasks + 1)]


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


# ---------------------------------------------------------------------------------------------------------------
def record(timer, rows_out: list, dtype, fields: dict, op: str, impl: str, fn, flops: float, nbytes: float) -> None:
    """Times fn (timer), appends its row (fields, op, impl, FLOPs, bytes and the floor they set) and prints it."""
    r = timer(fn, impl)
    r.update(**fields, op=op, impl=impl, flops=flops, bytes=nbytes, floor_ms=floor_ms(flops, nbytes, dtype))
    rows_out.append(r)
    print(f"  {op:18s} {impl:34s} wall {r['wall_ms']:.4f} ms  gpu {r.get('gpu_ms')}", flush=True)


def bench_linear(timer, rows_out, group, n_in, n_out, tasks, rows_per_task, dtype, dev, compiled: bool):
    from harmodt_fast.kernels._common import device_offsets
    from harmodt_fast.kernels.masked_linear import launch_masked_dw, launch_masked_mm

    g = torch.Generator().manual_seed(0)
    M = tasks * rows_per_task
    x = torch.randn(M, n_in, generator=g).to(dev, dtype)
    w = (torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)).to(dev, dtype)
    b = torch.randn(n_out, generator=g).to(dev, dtype)
    dy = torch.randn(M, n_out, generator=g).to(dev, dtype)
    dense = torch.rand(tasks, n_out * n_in, generator=g) < 0.8
    packed = hf.ops.pack_masks(dense).to(dev)
    m_dense = dense.view(tasks, n_out, n_in).to(dev, dtype)  # what a materialising baseline keeps (1 el/weight)
    offsets = offsets_for(tasks, rows_per_task)
    offs = device_offsets(offsets, dev)
    tg = torch.zeros(tasks, n_out, n_in, device=dev)
    flops = 2.0 * M * n_in * n_out
    esz = torch.tensor([], dtype=dtype).element_size()
    act_bytes = (M * n_in + M * n_out) * esz
    w_bytes = n_in * n_out * esz
    mbytes = mask_bytes(tasks, n_in, n_out)
    shape = f"{M}x{n_in}->{n_out} T={tasks}"

    def add(op, impl, fn, nbytes, fl=flops):
        record(timer, rows_out, dtype, dict(group=group, shape=shape), op, impl, fn, fl, nbytes)

    def materialise_fwd(x, w, b):
        outs = []
        for t in range(tasks):
            lo, hi = offsets[t], offsets[t + 1]
            outs.append(F.linear(x[lo:hi], w * m_dense[t], b))
        return torch.cat(outs)

    fwd_bytes = act_bytes + w_bytes + mbytes
    add("forward", "ours", lambda: launch_masked_mm(x, w, packed, offs, True, bias=b), fwd_bytes)
    add("forward", "cuBLAS unmasked", lambda: F.linear(x, w, b), act_bytes + w_bytes)
    add("forward", "materialise eager", lambda: materialise_fwd(x, w, b), fwd_bytes)
    if compiled:
        cfn = torch.compile(materialise_fwd, backend="inductor" if dev.type == "cuda" else "aot_eager")
        add("forward", "materialise torch.compile", lambda: cfn(x, w, b), fwd_bytes)
    if grouped_mm_available():
        ends = torch.tensor(offsets[1:], dtype=torch.int32, device=dev)
        try:
            wm = w * m_dense
            torch._grouped_mm(x, wm.transpose(-2, -1), offs=ends)
            add("forward", "grouped_mm (W⊙M_t given)", lambda: torch._grouped_mm(x, wm.transpose(-2, -1), offs=ends),
                act_bytes + tasks * w_bytes)
            add("forward", "materialise + grouped_mm",
                lambda: torch._grouped_mm(x, (w * m_dense).transpose(-2, -1), offs=ends),
                act_bytes + 3 * tasks * w_bytes)
        except Exception as e:  # noqa: BLE001
            rows_out.append(dict(group=group, shape=shape, op="forward", impl="grouped_mm", wall_ms=None,
                                 gpu_ms=None, note=f"unavailable: {type(e).__name__}: {e}"[:200]))
    add("dX", "ours", lambda: launch_masked_mm(dy, w, packed, offs, False), fwd_bytes)
    add("dX", "cuBLAS unmasked", lambda: dy @ w, act_bytes + w_bytes)
    add("dX", "materialise eager",
        lambda: torch.cat([dy[offsets[t]:offsets[t + 1]] @ (w * m_dense[t]) for t in range(tasks)]), fwd_bytes)
    dw_bytes = act_bytes + w_bytes + mbytes
    add("dW+db", "ours", lambda: launch_masked_dw(dy, x, packed, offs, dtype, True, True), dw_bytes)
    add("dW+db+task", "ours", lambda: launch_masked_dw(dy, x, packed, offs, dtype, True, True, task_grads=tg),
        dw_bytes + 2 * tg.numel() * 4)
    add("dW+db", "cuBLAS unmasked", lambda: (dy.t() @ x, dy.sum(0)), act_bytes + w_bytes)

    def materialise_dw():
        dw = torch.zeros_like(w)
        for t in range(tasks):
            lo, hi = offsets[t], offsets[t + 1]
            dw += m_dense[t] * (dy[lo:hi].t() @ x[lo:hi])
        return dw, dy.sum(0)

    add("dW+db", "materialise eager", materialise_dw, dw_bytes)

    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))

    def ours_step():
        hf.ops.masked_linear(xl, wl, bl, packed, offsets, backend="triton").backward(dy)

    def cublas_step():
        F.linear(xl, wl, bl).backward(dy)

    def materialise_step():
        materialise_fwd(xl, wl, bl).backward(dy)

    add("fwd+bwd", "ours (autograd)", ours_step, 3 * fwd_bytes, 3 * flops)
    add("fwd+bwd", "cuBLAS unmasked (autograd)", cublas_step, 3 * fwd_bytes, 3 * flops)
    add("fwd+bwd", "materialise eager (autograd)", materialise_step, 3 * fwd_bytes, 3 * flops)
    if compiled:
        cstep = torch.compile(materialise_step, backend="inductor" if dev.type == "cuda" else "aot_eager")
        add("fwd+bwd", "materialise torch.compile", cstep, 3 * fwd_bytes, 3 * flops)


def bench_attention(timer, rows_out, group, B, L, H, heads, tasks, dtype, dev):
    from harmodt_fast.kernels.masked_attention import (
        launch_attention_bwd, launch_attention_fwd, masked_qkv_attention_op, pack_attention_mask)
    from harmodt_fast.kernels.masked_linear import launch_masked_mm
    from harmodt_fast.kernels._common import device_offsets
    from harmodt_fast.ops.masked_attention import attention_mask_3d

    g = torch.Generator().manual_seed(0)
    D = H // heads
    x = torch.randn(B * L, H, generator=g).to(dev, dtype)
    w = (torch.randn(3 * H, H, generator=g) / math.sqrt(H)).to(dev, dtype)
    b = torch.zeros(3 * H, device=dev, dtype=dtype)
    packed = hf.ops.pack_masks(torch.rand(tasks, 3 * H * H, generator=g) < 0.8).to(dev)
    seq_offsets = offsets_for(tasks, B // tasks)
    offs_rows = device_offsets([o * L for o in seq_offsets], dev)
    qkv = (torch.randn(B * L, 3 * H, generator=g)).to(dev, dtype)
    dout = torch.randn(B * L, H, generator=g).to(dev, dtype)
    pad = torch.randint(0, L // 2, (B, 1), generator=g)
    valid = torch.arange(L)[None, :] >= pad
    mask4 = ((torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(L, dtype=torch.bool))
    mask4 = mask4[:, None].to(dev)
    mbits = pack_attention_mask(attention_mask_3d(mask4, B, L, dev))  # what the op does once per call
    esz = torch.tensor([], dtype=dtype).element_size()
    attn_flops = 2.0 * 2 * B * heads * L * L * D / 2  # QKᵀ and PV over the causal half
    attn_bytes = B * L * 4 * H * esz + B * L * L  # qkv in, out, the bool mask
    shape = f"B={B} L={L} H={H} heads={heads}"

    add = functools.partial(record, timer, rows_out, dtype, dict(group=group, shape=shape))

    def heads_view(t):
        return t.view(B, L, 3, heads, D).permute(2, 0, 3, 1, 4)

    def sdpa(qkv, mask=True):
        q, k, v = heads_view(qkv)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4 if mask else None, is_causal=not mask)
        return y.transpose(1, 2).reshape(B * L, H)

    add("attention fwd", "ours (DT mask, causal)",
        lambda: launch_attention_fwd(qkv, mbits, B, L, heads, True, 0.0, None), attn_flops, attn_bytes)
    add("attention fwd", "SDPA bool mask (as the model)", lambda: sdpa(qkv), attn_flops, attn_bytes)
    add("attention fwd", "SDPA is_causal (no padding mask)", lambda: sdpa(qkv, mask=False), attn_flops, attn_bytes)
    out, lse = launch_attention_fwd(qkv, mbits, B, L, heads, True, 0.0, None)
    add("attention bwd", "ours (DT mask, causal)",
        lambda: launch_attention_bwd(dout, qkv, out, lse, mbits, B, L, heads, True, 0.0, None),
        2.5 * attn_flops, 2 * attn_bytes)
    qkv_l = qkv.clone().requires_grad_()

    def sdpa_fb(mask):
        sdpa(qkv_l, mask).backward(dout)

    add("attention fwd+bwd", "SDPA bool mask (autograd)", lambda: sdpa_fb(True), 3.5 * attn_flops, 3 * attn_bytes)
    add("attention fwd+bwd", "SDPA is_causal (autograd)", lambda: sdpa_fb(False), 3.5 * attn_flops, 3 * attn_bytes)
    proj_flops = 2.0 * B * L * H * 3 * H
    proj_bytes = B * L * 4 * H * esz + 3 * H * H * esz
    add("block inference", "ours one kernel (proj+attn)",
        lambda: masked_qkv_attention_op(x, w, b, packed, seq_offsets, mbits, B, L, heads, True),
        proj_flops + attn_flops, B * L * 2 * H * esz + 3 * H * H * esz + B * L * L)
    add("block inference", "ours masked_mm + attention",
        lambda: launch_attention_fwd(launch_masked_mm(x, w, packed, offs_rows, True, bias=b)[0], mbits, B, L,
                                     heads, True, 0.0, None), proj_flops + attn_flops, proj_bytes + attn_bytes)
    add("block inference", "cuBLAS unmasked + SDPA bool mask", lambda: sdpa(F.linear(x, w, b)),
        proj_flops + attn_flops, proj_bytes + attn_bytes)
    x3 = x.view(B, L, H).clone().requires_grad_()
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    dout3 = dout.view(B, L, H)

    def ours_block():
        hf.ops.masked_attention(x3, wl, bl, packed, seq_offsets, heads, attn_mask=mask4, causal=True,
                                backend="triton").backward(dout3)

    def unmasked_block():
        sdpa(F.linear(x3.view(B * L, H), wl, bl)).view(B, L, H).backward(dout3)

    add("block fwd+bwd", "ours (autograd)", ours_block, 3 * (proj_flops + attn_flops), 3 * (proj_bytes + attn_bytes))
    add("block fwd+bwd", "cuBLAS unmasked + SDPA (autograd)", unmasked_block, 3 * (proj_flops + attn_flops),
        3 * (proj_bytes + attn_bytes))


def bench_mlp(timer, rows_out, group, hidden, mlp, tasks, rows_per_task, dtype, dev):
    from harmodt_fast.kernels import masked_mlp as kmlp

    g = torch.Generator().manual_seed(0)
    M = tasks * rows_per_task
    x = torch.randn(M, hidden, generator=g).to(dev, dtype)
    w1 = (torch.randn(mlp, hidden, generator=g) / math.sqrt(hidden)).to(dev, dtype)
    w2 = (torch.randn(hidden, mlp, generator=g) / math.sqrt(mlp)).to(dev, dtype)
    b1 = torch.zeros(mlp, device=dev, dtype=dtype)
    b2 = torch.zeros(hidden, device=dev, dtype=dtype)
    m1 = hf.ops.pack_masks(torch.rand(tasks, mlp * hidden, generator=g) < 0.8).to(dev)
    m2 = hf.ops.pack_masks(torch.rand(tasks, mlp * hidden, generator=g) < 0.8).to(dev)
    offsets = offsets_for(tasks, rows_per_task)
    dy = torch.randn(M, hidden, generator=g).to(dev, dtype)
    esz = torch.tensor([], dtype=dtype).element_size()
    flops = 2.0 * 2 * M * hidden * mlp
    io = 2 * M * hidden * esz + 2 * mlp * hidden * esz + 2 * mask_bytes(tasks, hidden, mlp)
    shape = f"{M}x{hidden}->{mlp}->{hidden} T={tasks}"

    add = functools.partial(record, timer, rows_out, dtype, dict(group=group, shape=shape))

    def ours_inf():
        with torch.no_grad():
            return hf.ops.masked_mlp(x, w1, b1, m1, w2, b2, m2, offsets, backend="triton")

    def two_launch_inf():
        saved = kmlp.FUSE_MAX_OUT
        kmlp.FUSE_MAX_OUT = 0
        try:
            return ours_inf()
        finally:
            kmlp.FUSE_MAX_OUT = saved

    add("inference", "ours chain kernel" if kmlp.chain_fits(hidden) else "ours (two launches: too wide)",
        ours_inf, flops, io)
    add("inference", "ours two launches", two_launch_inf, flops, io + 2 * M * mlp * esz)
    add("inference", "cuBLAS unmasked", lambda: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), flops,
        io + 2 * M * mlp * esz)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]

    def ours_train(fuse):
        saved = kmlp.FUSE_TRAINING
        kmlp.FUSE_TRAINING = fuse
        try:
            hf.ops.masked_mlp(leaves[0], leaves[1], leaves[2], m1, leaves[3], leaves[4], m2, offsets,
                              backend="triton").backward(dy)
        finally:
            kmlp.FUSE_TRAINING = saved

    def cublas_train():
        F.linear(F.relu(F.linear(leaves[0], leaves[1], leaves[2])), leaves[3], leaves[4]).backward(dy)

    add("fwd+bwd", "ours (chain where it fits)", lambda: ours_train(True), 3 * flops, 3 * io + 4 * M * mlp * esz)
    add("fwd+bwd", "ours (two launches)", lambda: ours_train(False), 3 * flops, 3 * io + 6 * M * mlp * esz)
    add("fwd+bwd", "cuBLAS unmasked (autograd)", cublas_train, 3 * flops, 3 * io + 6 * M * mlp * esz)


# ---------------------------------------------------------------------------------------------------------------
def best_ms(r):
    return r.get("gpu_ms") if r.get("gpu_ms") is not None else r.get("wall_ms")


def find(rows, group, shape, op, impl_prefix):
    for r in rows:
        if r.get("group") == group and r.get("shape") == shape and r.get("op") == op and \
                str(r.get("impl", "")).startswith(impl_prefix) and best_ms(r) is not None:
            return best_ms(r)
    return None


def targets(rows) -> list[dict]:
    """The issue's speed targets, evaluated on this run's numbers (ratios > 1 mean ours is faster)."""
    out = []
    shapes = {(r["group"], r["shape"]) for r in rows if r.get("group") in ("linear-paper", "linear-large")}
    for group, shape in sorted(shapes):
        ours = find(rows, group, shape, "forward", "ours")
        large, paper = group == "linear-large", group == "linear-paper"
        for impl, need, label in [("cuBLAS unmasked", 0.9 if large else None, "vs cuBLAS dense"),
                                  ("materialise eager", 2.0 if paper else None, "vs materialise eager"),
                                  ("materialise torch.compile", 1.0, "vs materialise torch.compile")]:
            other = find(rows, group, shape, "forward", impl)
            if ours and other:
                ratio = other / ours
                out.append(dict(shape=shape, target=label, ratio=round(ratio, 3), need=need,
                                met=None if need is None else ratio >= need))
    for r in rows:
        if r.get("group", "").startswith("attention") and r["op"] == "attention fwd" and r["impl"].startswith("ours"):
            sd = find(rows, r["group"], r["shape"], "attention fwd", "SDPA bool mask")
            if sd and best_ms(r):
                ratio = sd / best_ms(r)
                out.append(dict(shape=r["shape"], target="attention fwd vs SDPA (bool mask)", ratio=round(ratio, 3),
                                need=1.0, met=ratio >= 1.0))
    return out


def write_results(rows, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    base = os.path.join(out_dir, f"kernels_{slug}_{meta['date']}")
    tg = targets(rows)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": tg}, f, indent=1)
    lines = [f"# Task-masked kernels: {meta['device']}", "",
             f"date {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
             f"dtype {meta['dtype']}, {meta['mode']}", "",
             f"gpu ms: CUDA-graph replay (no launch overhead); wall ms: eager launches. floor: max(FLOPs / "
             f"{meta['ceilings']['matmul_bf16_tflops']:.1f} TFLOP/s, bytes / {meta['ceilings']['copy_tbps']:.2f} TB/s), "
             f"ceilings measured on this device.", ""]
    for group in dict.fromkeys(r.get("group") for r in rows):
        lines += [f"## {group}", "", "| shape | op | impl | gpu ms | wall ms | TFLOP/s | floor ms | % of floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("group") != group:
                continue
            ms = best_ms(r)
            tf = f"{r['flops'] / (ms * 1e-3) / 1e12:.1f}" if ms and r.get("flops") else "-"
            pct = f"{100 * r['floor_ms'] / ms:.0f}" if ms and r.get("floor_ms") else "-"
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {r['shape']} | {r['op']} | {r['impl']}{note} | {fmt(r.get('gpu_ms'))} | "
                         f"{fmt(r.get('wall_ms'))} | {tf} | {fmt(r.get('floor_ms'))} | {pct} |")
        lines.append("")
    lines += ["## Targets", "", "| shape | target | ratio (their time / ours) | need | met |", "|---|---|---|---|---|"]
    for t in tg:
        lines.append(f"| {t['shape']} | {t['target']} | {t['ratio']} | {t['need'] or '-'} | "
                     f"{'-' if t['met'] is None else ('yes' if t['met'] else 'NO')} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one call each: checks every path (CPU ok)")
    ap.add_argument("--compiled", choices=("paper", "all", "none"), default="paper",
                    help="shapes that also time the torch.compile'd materialising baseline (compiling is slow)")
    ap.add_argument("--only", default="linear,attention,mlp")
    ap.add_argument("--ceilings", help="JSON written by device_ceilings.py on this device (else measured now)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("kernels: the timing table needs a CUDA GPU; use --smoke to exercise the code paths on CPU")
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    import triton
    from harmodt_fast.kernels import _common

    CEILINGS.update(device_ceilings.load(args.ceilings, dev))
    meta = dict(device=torch.cuda.get_device_name(0) if cuda else f"cpu-interpreter-{platform.machine()}",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.date.today().isoformat(), dtype=str(dtype).replace("torch.", ""),
                mode="smoke (tiny shapes, single calls: not a measurement)" if args.smoke else "full",
                python=platform.python_version(), grouped_mm=grouped_mm_available(), ceilings=dict(CEILINGS),
                poison=_common.POISON, autotune=os.environ.get("HARMODT_FAST_AUTOTUNE", "1") != "0")
    print(meta, flush=True)
    timer = Timer(args.smoke)
    rows: list[dict] = []
    only = set(args.only.split(","))
    if args.smoke:
        tasks, rpt = 3, 5
        linear = [("linear-paper", 32, 48)]
        attn = [("attention-paper", 6, 9, 32, 2)]
        mlps = [("mlp-paper", 32, 64)]
    else:
        tasks, rpt = 50, 600
        linear = [("linear-paper", i, o) for i, o in PAPER_LINEAR] + [("linear-large", i, o) for i, o in LARGE_LINEAR]
        attn = [("attention-paper", 400, 75, 256, 8), ("attention-large", 400, 75, 1024, 16)]
        mlps = [("mlp-paper", 256, 1024), ("mlp-large", 1024, 4096)]
    # the paper shapes of every op first, then the large ones (what a time limit cuts is the least valuable);
    # results are rewritten after every shape, so a run cut short still leaves its table
    for size in ("paper", "large"):
        if "linear" in only:
            for group, n_in, n_out in [c for c in linear if c[0].endswith(size)]:
                print(f"{group} {n_in}->{n_out}", flush=True)
                compiled = args.compiled == "all" or (args.compiled == "paper" and group == "linear-paper")
                bench_linear(timer, rows, group, n_in, n_out, tasks, rpt, dtype, dev, compiled)
                write_results(rows, meta, args.out)
        if "attention" in only:
            for group, B, L, H, heads in [c for c in attn if c[0].endswith(size)]:
                print(f"{group} B={B} L={L} H={H} heads={heads}", flush=True)
                bench_attention(timer, rows, group, B, L, H, heads, tasks, dtype, dev)
                write_results(rows, meta, args.out)
        if "mlp" in only:
            for group, hidden, mlp in [c for c in mlps if c[0].endswith(size)]:
                print(f"{group} {hidden}->{mlp}", flush=True)
                bench_mlp(timer, rows, group, hidden, mlp, tasks, rpt, dtype, dev)
                write_results(rows, meta, args.out)
    base = write_results(rows, meta, args.out)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
