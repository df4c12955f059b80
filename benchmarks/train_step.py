"""Training-step throughput, every path side by side on ONE device in one run:

    ours (eager)             the trainer's step, masked ops on backend "auto" (triton on CUDA, cpp on CPU)
    ours (compiled)          the same with compile=True (torch.compile of the forward and loss)
    ours (compiled step)     the same with compile="step" (also the clip, AdamW and restore; CUDA graphs on CUDA)
    plain PyTorch (eager)    the trainer's step with backend="torch" (W ⊙ M_t built per task segment)
    plain PyTorch (compiled) the same with compile=True
    unmasked prompt-dt       method="prompt-dt" at the same batch: the dense ceiling
    published procedure      the re-implemented published step (benchmarks/published_baseline.py), one task per
                             step, on the same device
plus one mask update each way (ours: one backward + hf.ops.harmony_update; published: one backward per task +
top-k). Every path trains on device-resident batches built before timing (nothing is copied from the host inside
a timed step) and the device is synchronised before and after every timed region. Each row also reports, from
one step under torch.profiler, the kernel launches per step and the host time (until the step returns) against
the device time (kernels' summed duration).

    python -m harmodt_fast.benchmarks.train_step --device cuda --preset paper --tasks 50 --out benchmarks/results

FLOPs (flops_per_sequence): 2.23 GFLOP per sequence forward+backward at the paper preset (75 tokens), so a step
over MT50 x 8 sequences is 0.89 TFLOP; with --ceilings (device_ceilings.py's record) every row states its
TFLOP/s as a fraction of the bf16 matmul ceiling measured on the same device. --profile-top N lists each row's
N kernels with the most device time.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.benchmarks import device_ceilings
from harmodt_fast.benchmarks.published_baseline import PublishedProcedure
from harmodt_fast.trainer import Trainer

ROWS = ("ours", "ours-compiled", "ours-step", "torch", "torch-compiled", "prompt-dt", "published", "mask-update", "gemm-floor")


class PrebuiltSampler(SyntheticSampler):
    """SyntheticSampler whose batches are built on the device up front and then cycled: a timed step reads no
    host data."""

    def __init__(self, config, device, count: int = 4):
        super().__init__(config, device=device)
        self._mixed = itertools.cycle([super(PrebuiltSampler, self).sample() for _ in range(count)])
        self._per_task = {t: super(PrebuiltSampler, self).sample(task=t) for t in range(config.num_tasks)}

    def sample(self, task: int | None = None):
        return next(self._mixed) if task is None else self._per_task[task]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, min_steps: int, max_seconds: float, warmup: int = 2) -> tuple[float, int]:
    for _ in range(warmup):  # compiles, autotunes
        fn()
    sync(device)
    t0, n = time.perf_counter(), 0
    while n < min_steps or (time.perf_counter() - t0 < max_seconds and n < 200):
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n, n


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def profile(fn, device, top: int = 0) -> dict:
    """Kernel launches, host time and device time of one call of `fn` (already warm); with `top`, the `top`
    kernels by device time. Launches: the runtime/driver launch calls (Triton 3.x launches through
    cuLaunchKernelEx) and, as a cross-check, the kernels the device ran."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        sync(device)
    events = prof.events()
    if device.type != "cuda":
        ops = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU]
        return {"host_ms": host * 1e3, "cpu_ops": len(ops)}
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    dur = lambda e: e.device_time if hasattr(e, "device_time") else e.cuda_time  # noqa: E731  (older torch)
    out = {"launches": sum(1 for e in events if e.name in LAUNCH_CALLS), "kernels": len(kernels),
           "host_ms": host * 1e3, "device_ms": sum(dur(e) for e in kernels) / 1e3}
    if top:
        by_name: dict[str, list] = {}
        for e in kernels:
            acc = by_name.setdefault(e.name, [0, 0.0])
            acc[0] += 1
            acc[1] += dur(e) / 1e3
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
        out["top_kernels"] = [{"name": n[:160], "calls": c, "device_ms": ms} for n, (c, ms) in ranked]
    return out


def flops_per_sequence(cfg) -> float:
    """Training FLOPs of one sequence (forward + backward = 3 x forward): the block matmuls and attention
    (QKᵀ and PV over all L x L pairs); embeddings and the action head are a rounding error."""
    L, H = cfg.tokens_per_sequence, cfg.hidden
    per_token = 2 * (3 * H * H + H * H + 2 * H * cfg.mlp_hidden)
    attention = 2 * 2 * L * L * H
    return 3.0 * cfg.layers * (L * per_token + attention)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda: every path runs on this one device")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0, help="time budget per measurement")
    ap.add_argument("--min-steps", type=int, default=2, help="timed steps at least (a dry run: 1)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}, run in this order")
    ap.add_argument("--profile-top", type=int, default=0, help="list the N kernels with most device time per row")
    ap.add_argument("--ceilings", help="JSON written by device_ceilings.py on this device: rows get the fraction "
                    "of the bf16 matmul ceiling they reach")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="extra config override for every path (as the train CLI's --set)")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="N busy-looping processes beside the measurement (a shared machine)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        return _measure(args, ap)
    finally:
        for proc in busy:
            proc.kill()


def gemm_floor(cfg, device, seconds: float) -> dict:
    """The step's matmuls alone at the model's shapes (fp32): every block's four projections forward and both
    backward products, the attention products, all task rows at once. Sequences/s at this rate is the floor a
    step cannot beat on this device with these threads."""
    rows = cfg.batch_per_task * cfg.num_tasks * cfg.tokens_per_sequence
    H, M, L = cfg.hidden, cfg.mlp_hidden, cfg.tokens_per_sequence
    B = cfg.batch_per_task * cfg.num_tasks
    mats = [(rows, H, 3 * H), (rows, H, H), (rows, H, M), (rows, M, H)]
    operands = [(torch.randn(m, k, device=device), torch.randn(k, n, device=device)) for m, k, n in mats]
    q = torch.randn(B * cfg.heads, L, H // cfg.heads, device=device)

    def one_step():
        for _ in range(cfg.layers):
            for a, b in operands:  # forward, dX, dW
                a @ b, (a @ b) @ b.t(), a.t() @ (a @ b)
            for _ in range(2):  # six L x L x d products: QKᵀ and PV forward, two backward products each
                torch.bmm(torch.bmm(q, q.transpose(1, 2)), q), torch.bmm(q, q.transpose(1, 2))

    sec, n = timed(one_step, device, 2, seconds)
    return {"s_per_step": sec, "steps_timed": n, "sequences_per_s": B / sec}


def _measure(args, ap) -> int:
    from harmodt_fast.cli import _parse_overrides

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    order = args.rows.split(",")
    unknown = set(order) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; expected some of {ROWS}")
    extra = _parse_overrides(args.set)
    torch.manual_seed(0)
    base_cfg = hf.HarmoDTConfig.from_preset(args.preset, num_tasks=args.tasks, **extra)
    seqs = base_cfg.batch_per_task * base_cfg.num_tasks
    sampler = PrebuiltSampler(base_cfg, device)
    args.ceilings_record = device_ceilings.load(args.ceilings, device) if args.ceilings else None
    rows = []
    trainers: dict[str, Trainer] = {}

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, args, base_cfg, device)

    paths = {"ours": ("ours (eager)", {}), "ours-compiled": ("ours (compiled)", dict(compile=True)),
             "ours-step": ("ours (compiled step)", dict(compile="step")),
             "torch": ("plain PyTorch (eager)", dict(backend="torch")),
             "torch-compiled": ("plain PyTorch (compiled)", dict(backend="torch", compile=True)),
             "prompt-dt": ("unmasked prompt-dt (dense ceiling)", dict(method="prompt-dt"))}
    published = {}

    def published_procedure():
        if "pub" not in published:
            amp = torch.bfloat16 if device.type == "cuda" else None
            published["pub"] = PublishedProcedure(base_cfg, amp_dtype=amp, device=device)
            published["amp"] = amp
        return published["pub"]

    for key in order:
        if key in paths:
            label, kw = paths[key]
            cfg = hf.HarmoDTConfig.from_dict({**base_cfg.to_dict(), **kw})
            tr = trainers[key] = Trainer(cfg, sampler, tempfile.mkdtemp(), device, "synthetic")
            sec, n = timed(tr._train_step, device, args.min_steps, args.seconds, args.warmup)
            record({"path": label, "s_per_step": sec, "steps_timed": n, "sequences_per_s": seqs / sec,
                    "masked_linear_backend": hf.ops.last_backend("masked_linear") if cfg.use_masks else None,
                    **profile(tr._train_step, device, args.profile_top)})
        elif key == "published":
            pub = published_procedure()
            state = {"t": 0}

            def pub_step():
                t = state["t"] % base_cfg.num_tasks
                state["t"] += 1
                pub.train_step(sampler.sample(task=t), t)

            sec, n = timed(pub_step, device, args.min_steps, args.seconds, args.warmup)
            record({"path": f"published procedure (re-implemented), {'bf16' if published['amp'] else 'fp32'}",
                    "s_per_step": sec, "steps_timed": n, "sequences_per_s": base_cfg.batch_per_task / sec,
                    **profile(pub_step, device, args.profile_top)})
        elif key == "gemm-floor":
            record({"path": "GEMM floor (the step's matmuls alone, fp32)", **gemm_floor(base_cfg, device, args.seconds)})
        elif key == "mask-update":
            tr = trainers.get("ours") or Trainer(base_cfg, sampler, tempfile.mkdtemp(), device, "synthetic")
            sec, n = timed(tr._mask_update, device, 1, args.seconds, min(args.warmup, 1))
            record({"path": "ours mask update (1 backward + harmony_update)", "s_per_update": sec,
                    "updates_timed": n, "harmony_backend": hf.ops.last_backend("harmony_update")})
            pub = published_procedure()
            batches = [sampler.sample(task=t) for t in range(base_cfg.num_tasks)]
            sync(device)
            t0 = time.perf_counter()
            pub.mask_update(batches, k=100)
            sync(device)
            record({"path": "published mask update (T backwards + top-k)", "s_per_update": time.perf_counter() - t0,
                    "updates_timed": 1})
    path = write(rows, args, base_cfg, device)
    print("wrote", path)
    return 0


def write(rows, args, cfg, device) -> str:
    """Rewrites the .json and .md tables (after every row, so a run cut short keeps what it measured)."""
    pub = next((r for r in rows if r["path"].startswith("published procedure")), None)
    dense = next((r for r in rows if r["path"].startswith("unmasked prompt-dt")), None)
    flops = flops_per_sequence(cfg)
    ceiling = args.ceilings_record["matmul_bf16_tflops"] if args.ceilings_record else None
    for r in rows:
        if "sequences_per_s" in r:
            r["x_published"] = r["sequences_per_s"] / pub["sequences_per_s"] if pub else None
            r["x_dense"] = r["sequences_per_s"] / dense["sequences_per_s"] if dense else None
            r["tflops"] = r["sequences_per_s"] * flops / 1e12
            r["fraction_of_matmul_ceiling"] = r["tflops"] / ceiling if ceiling else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    meta = {"benchmark": "train_step", "preset": args.preset, "num_tasks": cfg.num_tasks,
            "batch_per_task": cfg.batch_per_task, "tokens_per_sequence": cfg.tokens_per_sequence, "device": name,
            "torch": torch.__version__, "python": platform.python_version(), "flops_per_sequence": flops,
            "ceilings": args.ceilings_record, "poison": os.environ.get("HARMODT_POISON") == "1",  # False to time
            "autotune": os.environ.get("HARMODT_FAST_AUTOTUNE", "1") != "0", "busy_processes": args.busy,
            "cpu_wait_policy": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m harmodt_fast.benchmarks.train_step " + " ".join(sys.argv[1:]), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_step_{device.type}_{args.preset}_T{cfg.num_tasks}"
                                  f"{f'_busy{args.busy}' if args.busy else ''}_{meta['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
    with open(stem + ".md", "w") as f:
        f.write(f"# Training step, {args.preset} preset, {cfg.num_tasks} tasks x {cfg.batch_per_task} sequences\n\n"
                f"{name}, torch {meta['torch']}, {meta['date']}\n\n| path | ms/step or update | sequences/s | "
                "x published | x dense | TFLOP/s | of ceiling | launches | host ms | device ms |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            sec = r.get("s_per_step", r.get("s_per_update"))
            f.write(f"| {r['path']} | {fmt(sec * 1e3, '.2f')} | {fmt(r.get('sequences_per_s'), '.0f')} | "
                    f"{fmt(r.get('x_published'), '.2f')} | {fmt(r.get('x_dense'), '.2f')} | "
                    f"{fmt(r.get('tflops'), '.3f')} | {fmt(r.get('fraction_of_matmul_ceiling'), '.3f')} | "
                    f"{fmt(r.get('launches'), 'd')} | {fmt(r.get('host_ms'), '.2f')} | "
                    f"{fmt(r.get('device_ms'), '.2f')} |\n")
    return stem + ".json"


if __name__ == "__main__":
    sys.exit(main())
