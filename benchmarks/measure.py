"""Time and peak memory of one call, and the machine's description: shared by the benchmarks that run each case
in a fresh subprocess (harmony.py, scale.py).

CPU peak extra memory = VmHWM after the call - VmRSS just before it (/proc/self/status), with free heap memory
handed back to the OS (glibc malloc_trim) and the peak reset (`echo 5 > /proc/self/clear_refs`) right before the
call; CUDA: torch.cuda.max_memory_allocated() after - memory_allocated() before (peak stats reset).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def malloc_trim() -> None:
    # free heap memory glibc keeps resident would absorb the op's allocations without raising the RSS: hand it
    # back first, so that everything the op allocates and touches shows in VmHWM
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device, repeats):
    """(wall times [s], process CPU times [s], the largest peak extra bytes, fn's last result) over `repeats` calls."""
    import torch

    times, cpus, peaks, out = [], [], [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            peaks.append(torch.cuda.max_memory_allocated() - before)
        else:
            malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = status_kb("VmRSS")
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            peaks.append((status_kb("VmHWM") - before) * 1024)
    return times, cpus, max(peaks), out


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=HERE).stdout.strip()
    except OSError:
        pass
    return info
