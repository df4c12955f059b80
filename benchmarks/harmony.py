"""The harmony mask update at the paper scale: MT50 x the paper model's 4,718,592 masked weights.

    python -m harmodt_fast.benchmarks.harmony                   # CPU: cpp op vs the PyTorch reference
    python -m harmodt_fast.benchmarks.harmony --device cuda     # GPU: torch ops on the device vs the reference there
    python -m harmodt_fast.benchmarks.harmony --versus ../other # the whole-buffer cpp op here vs another checkout
(or `harmodt-fast bench harmony ...`)

Every case runs in a fresh subprocess, so that its peak memory is its own:
- CPU: peak extra memory = VmHWM after the call - VmRSS just before it, from /proc/self/status, with free heap
  memory handed back to the OS (glibc malloc_trim) and the peak reset (`echo 5 > /proc/self/clear_refs`) right
  before the call. The inputs (gradients [T, P], weights, packed masks) are allocated before, so "extra" is what
  the op itself allocates and touches, its output included (the new packed masks: 28.1 MiB for MT50).
- CUDA: torch.cuda.max_memory_allocated() after the call - memory_allocated() before it (peak stats reset).
Time: wall clock of the call (CUDA: synchronised), the median over --repeats calls after one warm-up call on a
small input (the reference, tens of seconds per call here, runs once), and the process CPU time of the call (all
threads): on a shared machine the wall clock depends on how many cores were free (the 1-min load average before
each case is recorded), the CPU time much less. Each case also reports a SHA-256 of the
new packed masks: the cases that take the same gradients must agree bit for bit.

The inputs are those of a mask update in training: ERK masks at density 0.8 (hf.TaskMasks.erk over the paper
model's masked weights, flattened in model order), gradients ~N(0, 1e-4) (fp32, and bf16 for the cpp op), k = 100
flips per task (the schedule's peak), gamma 10, score fisher. "cpp-rows" feeds the same gradients layer by layer
(views of the [T, P] buffer, all T rows, ḡ summed by the engine) through HarmonyRows, then writes the flips with
apply_candidates. task_agreement is timed against the plain expression (float64 copy, one matmul).

--versus ROOT times the whole-buffer cpp harmony_update of this checkout and of the checkout at ROOT (each with
its own built extension) side by side, rounds alternating between them, at T = 10 and 50 tasks x 2^20 entries
(random masks at density 0.8, k = 100), and prints the medians and their ratio (no files written).

Writes results/harmony_<device>_<date>.json and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

GRAD_SCALE = 1e-4


from harmodt_fast.benchmarks.measure import machine, measure as _measure  # noqa: E402  (shared with scale.py)
from harmodt_fast.ops.harmony import DEFAULT_GAMMA, DEFAULT_SCORE  # noqa: E402


def _inputs(tasks: int, preset: str, device, dtype, seed: int = 0):
    import torch

    import harmodt_fast as hf
    from harmodt_fast.masks import masked_weight_shapes

    cfg = hf.HarmoDTConfig.from_preset(preset, num_tasks=tasks)
    with torch.device("meta"):
        model = hf.HarmoDT(cfg)
    shapes = masked_weight_shapes(model)
    masks = hf.TaskMasks.erk(shapes, tasks, density=0.8, seed=seed)
    packed = masks.flat_packed().to(device)
    P = masks.numel
    gen = torch.Generator().manual_seed(seed)
    grads = torch.empty(tasks, P, dtype=dtype, device=device)
    for t in range(tasks):  # row by row: no second [T, P] buffer
        grads[t] = (torch.randn(P, generator=gen) * GRAD_SCALE).to(device, dtype)
    weight = (torch.randn(P, generator=gen) * 0.05).to(device)
    sizes = [a * b for a, b in shapes.values()]
    return weight, grads, packed, sizes


def worker(args) -> dict:
    import torch

    import harmodt_fast as hf
    from harmodt_fast.ops import harmony as H

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    weight, grads, packed, sizes = _inputs(args.tasks, args.preset, device, dtype)
    T, P = grads.shape
    k, gamma, score = args.k, DEFAULT_GAMMA, DEFAULT_SCORE

    # warm-up on a small input: extension loading / JIT, lazy inits, CUDA context and kernels
    small = (weight[:4096], grads[:, :4096], packed[:, :128].contiguous())
    case = args.worker
    if case == "reference":
        ks = H.check_harmony_args(weight, grads, packed, k, gamma, score)
        fn = lambda: H.harmony_update_torch(weight, grads, packed, ks, gamma, score)  # noqa: E731
        H.harmony_update_torch(*small, ks, gamma, score)
    elif case == "cpp":
        fn = lambda: hf.ops.harmony_update(weight, grads, packed, k, gamma, score, backend="cpp")  # noqa: E731
        hf.ops.harmony_update(*small, k, gamma, score, backend="cpp")
    elif case == "torch-device":
        fn = lambda: hf.ops.harmony_update(weight, grads, packed, k, gamma, score, backend="torch")  # noqa: E731
        hf.ops.harmony_update(*small, k, gamma, score, backend="torch")
    elif case == "cpp-rows" or case == "torch-rows":
        from harmodt_fast.ops.harmony_rows import HarmonyRows, apply_candidates

        backend = case.split("-")[0]

        def fn():
            rows = HarmonyRows(T, P, packed, k, gamma, score, backend=backend)
            start = 0
            for n in sizes:  # layer by layer, views of the [T, P] buffer
                rows.feed_rows(weight[start : start + n], grads[:, start : start + n], None, 0, start)
                start += n
            new = packed.clone()
            return new, apply_candidates([new], [P], rows.k, rows.candidates())

        HarmonyRows(T, 4096, small[2], k, gamma, score, backend=backend).feed_rows(*small[:2], None, 0, 0)
    elif case in ("agreement-cpp", "agreement-torch"):
        backend = case.split("-")[1]
        fn = lambda: hf.ops.task_agreement(grads, backend=backend)  # noqa: E731
        hf.ops.task_agreement(small[1], backend=backend)
    elif case == "agreement-plain":
        def fn():
            g = grads.double()
            n = g.norm(dim=1)
            return (g @ g.t()) / torch.outer(n, n)

        fn_small = small[1].double()
        fn_small @ fn_small.t()
    else:
        raise SystemExit(f"unknown case {case}")
    repeats = 1 if case in ("reference",) else args.repeats
    load = os.getloadavg()[0]
    times, cpus, peak, out = _measure(fn, device, repeats)
    rec = {
        "case": case, "dtype": args.dtype, "device": str(device), "T": T, "P": P, "k": k,
        "time_s": statistics.median(times), "times_s": times, "cpu_s": statistics.median(cpus),
        "load_1min_before": load, "peak_extra_bytes": int(peak),
        "grad_buffer_bytes": grads.numel() * grads.element_size(), "threads": torch.get_num_threads(),
    }
    if isinstance(out, tuple):
        rec["masks_sha256"] = hashlib.sha256(out[0].cpu().numpy().tobytes()).hexdigest()
        rec["flips"] = int(out[1]["pruned"].sum())
        rec["implementation"] = H.last_implementation() if case in ("cpp", "torch-device") else case
    else:
        rec["agreement"] = out.cpu().tolist()
    return rec


# --- this checkout vs another ---------------------------------------------------------------------------------------
VERSUS_SHAPES = [(10, 1 << 20), (50, 1 << 20)]
VERSUS_WORKER = r"""
import hashlib, json, sys, time
import torch
import harmodt_fast as hf
T, P, k, calls = (int(v) for v in sys.argv[1:5])
gen = torch.Generator().manual_seed(0)
grads = torch.randn(T, P, generator=gen) * 1e-4
weight = torch.randn(P, generator=gen)
packed = hf.ops.pack_masks(torch.rand(T, P, generator=gen) < 0.8)
new = hf.ops.harmony_update(weight, grads, packed, k, backend="cpp")[0]  # warm-up (and load)
times = []
for _ in range(calls):
    t0 = time.perf_counter()
    hf.ops.harmony_update(weight, grads, packed, k, backend="cpp")
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "masks": hashlib.sha256(new.numpy().tobytes()).hexdigest(), "file": hf.__file__}))
"""


def versus(other: str, rounds: int, calls: int, k: int, out_dir: str) -> int:
    roots = {"this": os.path.dirname(HERE), "other": os.path.abspath(other)}
    times = {(name, shape): [] for name in roots for shape in VERSUS_SHAPES}
    masks = {}
    for r in range(rounds):
        for shape in VERSUS_SHAPES:
            for name in (("this", "other") if r % 2 == 0 else ("other", "this")):  # alternate who goes first
                env = dict(os.environ, PYTHONPATH=roots[name])
                res = subprocess.run([sys.executable, "-c", VERSUS_WORKER, *map(str, (*shape, k, calls))], env=env,
                                     capture_output=True, text=True, cwd=roots[name])
                if res.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
                out = json.loads(res.stdout.strip().splitlines()[-1])
                assert out["file"].startswith(roots[name]), (out["file"], roots[name])
                times[name, shape] += out["times"]
                masks.setdefault(shape, set()).add(out["masks"])
    print(f"whole-buffer cpp harmony_update, k={k}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"{rounds} rounds x {calls} calls; this={roots['this']} other={roots['other']}")
    for shape in VERSUS_SHAPES:
        a, b = statistics.median(times["this", shape]), statistics.median(times["other", shape])
        print(f"T={shape[0]:3d} P={shape[1]}: this {1e3 * a:8.1f} ms  other {1e3 * b:8.1f} ms  this/other {a / b:.3f}"
              f"  (masks equal: {len(masks[shape]) == 1})")

    def commit(root):
        res = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
        return res.stdout.strip() or None

    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "k": k, "rounds": rounds,
              "calls_per_round": calls, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "commits": {name: commit(root) for name, root in roots.items()},
              "shapes": [{"tasks": T, "entries": P, "median_s": {name: statistics.median(times[name, (T, P)])
                                                                   for name in roots},
                          "times_s": {name: times[name, (T, P)] for name in roots},
                          "masks_equal": len(masks[T, P]) == 1} for T, P in VERSUS_SHAPES]}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"harmony_versus_{record['date']}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return 0


# --- driver ---------------------------------------------------------------------------------------------------
def run_case(args, case: str, dtype: str) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--worker", case, "--dtype", dtype, "--device", args.device,
           "--tasks", str(args.tasks), "--preset", args.preset, "--k", str(args.k), "--repeats", str(args.repeats)]
    print(f"[harmony] {case} {dtype} ...", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{res.stderr[-4000:]}")
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"    {rec['time_s']:.3f} s, peak extra {rec['peak_extra_bytes'] / 2**20:.1f} MiB", flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow reference (no speed-up column)")
    ap.add_argument("--versus", metavar="ROOT", help="time the whole-buffer cpp op here vs the checkout at ROOT")
    ap.add_argument("--rounds", type=int, default=6, help="--versus: alternating rounds (one process each)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.versus:
        return versus(args.versus, args.rounds, args.repeats, args.k, args.out)

    if args.device == "cpu":
        plan = [("cpp", "fp32"), ("cpp", "bf16"), ("cpp-rows", "fp32"), ("reference", "fp32"),
                ("agreement-cpp", "fp32"), ("agreement-torch", "fp32"), ("agreement-plain", "fp32")]
    else:
        plan = [("torch-device", "fp32"), ("torch-device", "bf16"), ("torch-rows", "fp32"), ("reference", "fp32"),
                ("agreement-torch", "fp32"), ("agreement-plain", "fp32")]
    if args.skip_reference:
        plan = [p for p in plan if p[0] != "reference"]
    load = [os.getloadavg()[0]]
    rows = [run_case(args, case, dtype) for case, dtype in plan]
    load.append(os.getloadavg()[0])

    ref = next((r for r in rows if r["case"] == "reference"), None)
    fp32_hashes = {r["masks_sha256"] for r in rows if "masks_sha256" in r and r["dtype"] == "fp32"}
    for r in rows:
        r["peak_extra_share_of_grad_buffer"] = r["peak_extra_bytes"] / r["grad_buffer_bytes"]
        if ref is not None and "masks_sha256" in r:
            r["speedup_vs_reference"] = ref["time_s"] / r["time_s"]
            r["identical_to_reference"] = r["masks_sha256"] == ref["masks_sha256"] if r["dtype"] == "fp32" else None
    plain = next((r for r in rows if r["case"] == "agreement-plain"), None)
    for r in rows:
        if "agreement" in r and plain is not None:
            import torch

            diff = (torch.tensor(r["agreement"]) - torch.tensor(plain["agreement"])).abs().max().item()
            r["max_abs_diff_vs_plain"] = diff
            r["speedup_vs_plain"] = plain["time_s"] / r["time_s"]
        r.pop("agreement", None)
    date = datetime.date.today().isoformat()
    result = {
        "benchmark": "harmony mask update, MT50 x paper model masked weights",
        "date": date,
        "machine": machine(),
        "load_average_1min_start_end": load,
        "setup": {"tasks": args.tasks, "preset": args.preset, "k": args.k, "gamma": DEFAULT_GAMMA,
                  "score": DEFAULT_SCORE, "density": 0.8, "grad_scale": GRAD_SCALE, "repeats": args.repeats},
        "fp32_cases_identical": len(fp32_hashes) == 1,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"harmony_{args.device}_{date}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    s = result["setup"]
    lines = [
        f"# Harmony mask update: {s['tasks']} tasks x {result['rows'][0]['P']:,} masked weights ({result['date']})",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + f"; 1-min load average {result['load_average_1min_start_end']}"
        " (start, end; the machine is shared).",
        f"k = {s['k']} flips per task, gamma {s['gamma']}, score {s['score']}, ERK masks at density {s['density']}. "
        "Peak extra memory: see the method in benchmarks/harmony.py.",
        "",
        "| case | grads | wall time (s) | CPU time (s) | load before | speed-up vs reference (wall) | peak extra memory "
        "| share of gradient buffer | masks = reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "masks_sha256" not in r:
            continue
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['time_s']:.3f} | {r['cpu_s']:.3f} | {r['load_1min_before']:.1f} | "
            f"{r.get('speedup_vs_reference', float('nan')):.1f}x | {r['peak_extra_bytes'] / 2**20:.1f} MiB | "
            f"{100 * r['peak_extra_share_of_grad_buffer']:.1f}% | "
            f"{ {True: 'identical', False: 'DIFFERENT', None: 'n/a (bf16 input)'}.get(r.get('identical_to_reference'), 'n/a')} |"
        )
    agree = [r for r in result["rows"] if r["case"].startswith("agreement")]
    if agree:
        lines += ["", "| task_agreement | wall time (s) | CPU time (s) | speed-up vs plain (wall) | peak extra memory "
                  "| max abs diff vs plain |", "|---|---|---|---|---|---|"]
        for r in agree:
            lines.append(f"| {r['case']} | {r['time_s']:.3f} | {r['cpu_s']:.3f} | "
                         f"{r.get('speedup_vs_plain', float('nan')):.1f}x | "
                         f"{r['peak_extra_bytes'] / 2**20:.1f} MiB | {r.get('max_abs_diff_vs_plain', 0):.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
