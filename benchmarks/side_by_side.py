"""`harmodt-fast bench` (no benchmark named): side-by-side throughput on this machine, in one run, for one preset
and task count.

- masked_linear (what `auto` picks here) against the same unmasked matmul (F.linear) and against materialising
  W ⊙ M_t per task (the plain-PyTorch reference), forward + backward, at each masked layer shape of the preset
  with batch_per_task sequences of every task;
- a full training step (mixed-task, all tasks; and round-robin, one task per step), in sequences per second;
- one harmony mask update over all masked weights.
Batches are synthetic with the real shapes: the time does not depend on the values. The fuller benchmarks, with
the published-procedure baseline and the GPU kernel tables, are this package's other modules
(`harmodt-fast bench --help` lists them).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from harmodt_fast import ops
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.runtime import pick_device
from harmodt_fast.trainer import Trainer


def _time(fn, device: torch.device, seconds: float) -> float:
    """Mean seconds per call: one warm-up, then repeats until `seconds` have passed (at least 2 calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, rep=max(25, int(seconds * 1000))) / 1e3
    fn()
    start, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def run_bench(preset: str = "paper", num_tasks: int = 50, seconds: float = 3.0, device: str = "auto",
              out: str | None = None, verbose: bool = True) -> dict:
    dev = pick_device(device)
    cfg = HarmoDTConfig.from_preset(preset, num_tasks=num_tasks)
    rows = []

    def report(row):
        rows.append(row)
        if verbose:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    # masked matmuls at the preset's layer shapes
    tokens = cfg.tokens_per_sequence * cfg.batch_per_task
    offsets = torch.arange(num_tasks + 1) * cfg.batch_per_task
    gen = torch.Generator().manual_seed(0)
    shapes = {(cfg.hidden, 3 * cfg.hidden), (cfg.hidden, cfg.hidden), (cfg.hidden, cfg.mlp_hidden), (cfg.mlp_hidden, cfg.hidden)}
    for n_in, n_out in sorted(shapes):
        x = torch.randn(num_tasks * cfg.batch_per_task, cfg.tokens_per_sequence, n_in, generator=gen).to(dev)
        x.requires_grad_()
        w = (torch.randn(n_out, n_in, generator=gen) * 0.02).to(dev).requires_grad_()
        b = torch.zeros(n_out, device=dev, requires_grad=True)
        masks = ops.pack_masks(torch.rand(num_tasks, n_out * n_in, generator=gen) < cfg.density).to(dev)
        dy = torch.randn(x.shape[0], x.shape[1], n_out, generator=gen).to(dev)
        flops = 6.0 * x.shape[0] * x.shape[1] * n_in * n_out  # forward + dX + dW

        def run(fn):
            return lambda: torch.autograd.backward(fn(), dy)

        timings = {
            "dense F.linear": _time(run(lambda: F.linear(x, w, b)), dev, seconds),
            "masked (auto)": _time(run(lambda: ops.masked_linear(x, w, b, masks, offsets)), dev, seconds),
        }
        picked = ops.last_backend("masked_linear")
        timings["materialise per task (torch)"] = _time(
            run(lambda: ops.masked_linear(x, w, b, masks, offsets, backend="torch")), dev, seconds)
        for path, sec in timings.items():
            report({"what": f"linear {n_in}->{n_out} x {x.shape[0] * x.shape[1]} rows", "path": path,
                    "backend": picked if path == "masked (auto)" else "", "ms": sec * 1e3,
                    "tflops": flops / sec / 1e12, "x_dense": timings["dense F.linear"] / sec})

    # full training steps
    for schedule in ("mixed", "round-robin"):
        step_cfg = HarmoDTConfig.from_preset(preset, num_tasks=num_tasks, schedule=schedule)
        trainer = Trainer(step_cfg, SyntheticSampler(step_cfg, device=dev), tempfile.mkdtemp(), dev, "synthetic")
        sec = _time(trainer._train_step, dev, seconds)
        seqs = cfg.batch_per_task * (num_tasks if schedule == "mixed" else 1)
        report({"what": f"train step ({schedule})", "path": f"precision {trainer.amp_dtype or torch.float32}",
                "backend": ops.last_backend("masked_linear"), "ms": sec * 1e3, "sequences_per_s": seqs / sec})
        if schedule == "mixed" and step_cfg.use_masks:
            sec = _time(trainer._mask_update, dev, seconds)
            report({"what": "mask update (1 backward + harmony_update)", "path": "",
                    "backend": ops.last_backend("harmony_update"), "ms": sec * 1e3})

    result = {
        "preset": preset, "num_tasks": num_tasks, "batch_per_task": cfg.batch_per_task, "tokens": tokens,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows,
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        if verbose:
            print(f"wrote {out}")
    return result
