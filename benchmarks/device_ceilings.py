"""The device, its software, and its ceilings measured on it: stage (a) of the GPU run, and what every ratio of
that run is taken against (datasheet rates are leads, not ceilings).

    python -m harmodt_fast.benchmarks.device_ceilings --out env.json          # CUDA: the measurement
    python -m harmodt_fast.benchmarks.device_ceilings --out env.json --quick  # CPU (the dry run): not a measurement
    python -m harmodt_fast.benchmarks.device_ceilings --digest                # this checkout's source digest

Ceilings:
  matmul_bf16_tflops  an 8192 x 8192 x 8192 bf16 product on random data (torch.matmul, i.e. cuBLAS)
  matmul_fp32_tflops  a 4096^3 fp32 product in full precision (TF32 off)
  copy_tbps           a device-to-device copy of 2 GiB, bytes read plus bytes written
each the median of triton.testing.do_bench on CUDA (time.perf_counter medians on the CPU).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from harmodt_fast.benchmarks.measure import machine

HERE = os.path.dirname(os.path.abspath(__file__))


def _median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing as tt

        return tt.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(device: torch.device, quick: bool = False) -> dict:
    """{matmul_bf16_tflops, matmul_fp32_tflops, copy_tbps} measured on `device` (random data, never zeros)."""
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    n_bf16, n_fp32, copy_bytes = (512, 256, 1 << 24) if quick else (8192, 4096, 1 << 31)
    a = torch.randn(n_bf16, n_bf16, device=device, generator=g, dtype=torch.bfloat16)
    b = torch.randn(n_bf16, n_bf16, device=device, generator=g, dtype=torch.bfloat16)
    out["matmul_bf16_tflops"] = 2 * n_bf16**3 / (_median_ms(lambda: a @ b, device) * 1e-3) / 1e12
    del a, b
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n_fp32, n_fp32, device=device, generator=g)
        b = torch.randn(n_fp32, n_fp32, device=device, generator=g)
        out["matmul_fp32_tflops"] = 2 * n_fp32**3 / (_median_ms(lambda: a @ b, device) * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    del a, b
    src = torch.randn(copy_bytes // 4, device=device, generator=g)
    dst = torch.empty_like(src)
    out["copy_tbps"] = 2 * copy_bytes / (_median_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e12
    out["sizes"] = {"matmul_bf16_n": n_bf16, "matmul_fp32_n": n_fp32, "copy_bytes": copy_bytes}
    return out


def load(path: str | None, device: torch.device) -> dict:
    """The ceilings recorded in `path` (this script's output) when given, else measured now."""
    if path:
        with open(path) as f:
            return json.load(f)["ceilings"]
    return measure(device, quick=device.type != "cuda")


def floor_ms(flops: float, nbytes: float, dtype: torch.dtype, ceilings: dict) -> float:
    """max(FLOPs / the matmul ceiling of `dtype`, bytes / the copy ceiling): no version runs much faster."""
    tflops = ceilings["matmul_fp32_tflops" if dtype == torch.float32 else "matmul_bf16_tflops"]
    return max(flops / (tflops * 1e12), nbytes / (ceilings["copy_tbps"] * 1e12)) * 1e3


def source_digest() -> str:
    """sha256 of the project's source files (names and contents): names the code a run used where the checkout
    has no git history (the GPU machine gets a copy of the working tree); `--digest` prints it for a checkout. Run from
an installed package, it digests the checkout in the working directory (gpu_run.sh runs in the repo root)."""
    root = os.path.dirname(HERE)
    if not os.path.isdir(os.path.join(root, "csrc")):  # an installed copy: the checkout the command runs in
        root = os.getcwd()
    digest = hashlib.sha256()
    for folder in ("harmodt_fast", "kernels", "csrc", "benchmarks", "tests", "scripts"):
        for path in sorted(glob.glob(os.path.join(root, folder, "**", "*"), recursive=True)):
            if path.endswith((".py", ".cpp", ".h", ".sh")):
                with open(path, "rb") as f:
                    digest.update(os.path.relpath(path, root).encode() + b"\0" + f.read())
    return digest.hexdigest()


def record(device: torch.device) -> dict:
    """The machine (measure.machine: versions, CPU, commit), the date, the source digest and the device."""
    rec = {**machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "source_sha256": source_digest(), "device_type": device.type,
           "autotune": os.environ.get("HARMODT_FAST_AUTOTUNE", "1") != "0"}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rec.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), capability=f"{p.major}.{p.minor}")
        try:
            rec["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            rec["nvidia_smi"] = None
    else:
        rec["device"] = f"cpu ({rec.get('cpu') or platform.machine()})"
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run): exercises the code only")
    ap.add_argument("--digest", action="store_true", help="only print this checkout's source digest")
    args = ap.parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    if not args.out:
        ap.error("--out is required")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rec = record(device)
    print(json.dumps(rec), flush=True)
    rec["ceilings"] = measure(device, quick=args.quick)
    rec["ceilings"]["quick"] = args.quick
    print(json.dumps(rec["ceilings"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
