"""Compiles, on a machine WITHOUT a GPU, the Triton kernels that the GPU run (benchmarks/gpu_run.sh) launches at
its shapes, into a Triton cache that can travel with the run, so that the GPU's minutes are not spent compiling.

    python -m harmodt_fast.benchmarks.precompile --cache .triton-cache [--workers 2]

How: Triton's JIT is pointed at a stand-in driver whose target is an sm_90 GPU (H100/H200: capability 9.0, 132
SMs), every launch is turned into a compile-only warm-up, and the GPU run's workloads run on CPU tensors of the
same shapes and dtypes (the paper MT50 training step and mask update at its batch; the kernel-table shapes; the
large preset's training step at 50 and 160 tasks), several workloads at once in separate processes. Triton keys each compile by the kernel source, its specialisation (dtypes,
16-byte alignment, ints == 1 or multiples of 16, constexprs), the options, its own version and ptxas's: the GPU
machine finds these entries only if its Triton is the same version (the GPU machine has 3.6.0), and compiles
anything else itself. Kernel outputs are never computed here,
so the workloads' numbers are garbage: only which kernels they launch matters. Needs pinned configs
(HARMODT_FAST_AUTOTUNE=0, set here) since autotuning would time the kernels.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from harmodt_fast.benchmarks import kernel_variants

HERE = os.path.dirname(os.path.abspath(__file__))

H100_SMS = 132  # H100 SXM and H200 alike


def stand_in_gpu():
    """Points Triton's JIT at an sm_90 target and makes every launch compile-only."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class Sm90:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(Sm90())
    compile_only = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return compile_only(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = run
    # the kernels' host code takes CPU tensors for GPU ones: the triton backend accepts them, SM counts are a GPU's
    from harmodt_fast.kernels import masked_linear
    from harmodt_fast.ops import _dispatch

    _dispatch.triton_interpret = lambda: True
    masked_linear.num_sms = lambda device: H100_SMS


def workloads(quick: bool):
    """(name, callable) pairs: what gpu_run.sh's stages launch, on CPU tensors."""
    import torch

    import harmodt_fast as hf
    from harmodt_fast.trainer import Trainer

    from harmodt_fast.benchmarks import kernels as bench_kernels
    from harmodt_fast.benchmarks.train_step import PrebuiltSampler

    def train(preset, tasks, update=False, **kw):
        cfg = hf.HarmoDTConfig.from_preset(preset, num_tasks=tasks, backend="triton", precision="bf16", **kw)
        tr = Trainer(cfg, PrebuiltSampler(cfg, torch.device("cpu"), count=1), tempfile.mkdtemp(),
                     torch.device("cpu"), "synthetic")
        # the stand-in driver launches nothing, so the step's values are not numbers: record the divergence guard's
        # finding as on a GPU (no read-back before the optimiser), so the whole step and the update are compiled
        tr._watch.before_step = False
        tr._train_step()
        if update:
            tr._mask_update()

    if quick:
        return [("train tiny T=2", lambda: train("tiny", 2, update=True))]

    class OursOnly(bench_kernels.Timer):
        """Runs only our kernels' rows (the baselines launch no Triton kernel and would compute on the CPU)."""

        def __call__(self, fn, impl=""):
            if impl.startswith("ours"):
                fn()
            return {"wall_ms": 0.0, "gpu_ms": None}

    timer, rows, dt, cpu = OursOnly(smoke=True), [], torch.bfloat16, torch.device("cpu")
    bench_kernels.CEILINGS.update(matmul_bf16_tflops=1.0, matmul_fp32_tflops=1.0, copy_tbps=1.0)
    linear = [("linear-paper", i, o) for i, o in bench_kernels.PAPER_LINEAR] + \
        [("linear-large", i, o) for i, o in bench_kernels.LARGE_LINEAR]
    out = [("train paper T=50 + mask update", lambda: train("paper", 50, update=True))]
    out += [(f"{g} {i}->{o}", lambda g=g, i=i, o=o: bench_kernels.bench_linear(timer, rows, g, i, o, 50, 600, dt, cpu,
                                                                               False)) for g, i, o in linear]
    out += [(f"attention {H}", lambda H=H, h=h: bench_kernels.bench_attention(timer, rows, "a", 400, 75, H, h, 50, dt,
                                                                             cpu)) for H, h in ((256, 8), (1024, 16))]
    out += [(f"mlp {H}", lambda H=H, m=m: bench_kernels.bench_mlp(timer, rows, "m", H, m, 50, 600, dt, cpu))
            for H, m in ((256, 1024), (1024, 4096))]
    out += [(f"train large T={t}", lambda t=t: train("large", t, batch_per_task=1, dropout=0.0)) for t in (50, 160)]
    return out


def relocate(cache: str, prune: bool = False) -> int:
    """Points every entry's group file at the files where the cache is now (Triton records absolute paths, and a
    group whose files are not found there is a miss); with `prune`, keeps only what a cache hit reads (the
    metadata .json and the .cubin), so the cache travels small. Returns (entries, entries that held more than
    that: compiled since the last prune, not found in the cache)."""
    cache = os.path.abspath(cache)
    groups = glob.glob(os.path.join(cache, "*", "__grp__*.json"))
    fresh = 0
    for grp in groups:
        folder = os.path.dirname(grp)
        with open(grp) as f:
            children = json.load(f)["child_paths"]
        kept = {}
        extra = [name for name in children if not name.endswith((".json", ".cubin"))]
        fresh += bool(extra) and os.path.exists(os.path.join(folder, extra[0]))
        for name in children:
            path = os.path.join(folder, name)
            if prune and name in extra:
                if os.path.exists(path):
                    os.remove(path)
            elif os.path.exists(path):
                kept[name] = path
        tmp = grp + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"child_paths": kept}, f)
        os.replace(tmp, grp)
    return len(groups), fresh


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(HERE), ".triton-cache"))
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="workloads compiled at once (processes)")
    ap.add_argument("--quick", action="store_true", help="one tiny training step (a test)")
    ap.add_argument("--relocate", action="store_true", help="only point the cache's entries at where it is now "
                    "(run where a carried cache arrives)")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # one workload, in this process
    args = ap.parse_args(argv)
    if args.relocate:
        print(f"[precompile] {relocate(args.cache)[0]} cache entries relocated to {os.path.abspath(args.cache)}")
        return 0
    # TRITON_INTERPRET=0: compiled kernels even though this machine has no GPU (bench_kernels would set it to 1)
    os.environ.update(TRITON_CACHE_DIR=os.path.abspath(args.cache), HARMODT_FAST_AUTOTUNE="0", TRITON_INTERPRET="0")
    if args.only:
        stand_in_gpu()
        t0 = time.perf_counter()
        dict(workloads(args.quick))[args.only]()
        print(f"[precompile] {args.only}: {time.perf_counter() - t0:.1f} s", flush=True)
        return 0
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    # Triton's front end keeps per-thread state (a compile in a worker thread fails), so workloads compile in
    # parallel processes; the cache is safe to share (entries are written atomically)
    before = set(glob.glob(os.path.join(args.cache, "*", "*.cubin")))
    t0 = time.perf_counter()
    names = [name for name, _ in workloads(args.quick)]
    cmd = [sys.executable, "-m", __spec__.name, "--cache", args.cache] + (["--quick"] if args.quick else [])
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda n: subprocess.run(cmd + ["--only", n], capture_output=True, text=True), names))
    failed = [(n, r.stderr[-2000:]) for n, r in zip(names, results) if r.returncode]
    for n, r in zip(names, results):
        print(r.stdout.strip() or f"[precompile] {n}: FAILED", flush=True)
    _, compiled = relocate(args.cache, prune=True)
    cubins = set(glob.glob(os.path.join(args.cache, "*", "*.cubin")))
    counted = kernel_variants.count(cache=args.cache)
    ptxas = get_ptxas_version(90).strip().splitlines()[-2:]  # "Cuda compilation tools, release 12.8, V12.8.93"
    record = {"triton": triton.__version__, "ptxas": " ".join(ptxas), "target": "cuda sm_90",
              "seconds": round(time.perf_counter() - t0, 1), "workers": args.workers, "kernels": counted["compiled"],
              "new": len(cubins - before), "compiled": compiled, "failed": [n for n, _ in failed],
              "by_kernel": counted["compiled_by_kernel"], "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(record), flush=True)
    with open(os.path.join(args.cache, "precompiled.json"), "w") as f:
        json.dump(record, f, indent=1)
    for n, err in failed:
        print(f"--- {n} failed:\n{err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
