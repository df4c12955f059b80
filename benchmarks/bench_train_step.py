"""Training-step throughput, side by side in one run: our mixed-task step (fp32 and bf16 autocast), our
round-robin schedule (one task per step), and the re-implemented published procedure; plus one mask update
(ours: one backward + hf.ops.harmony_update; published: one backward per task + top-k).

    python benchmarks/bench_train_step.py --preset paper --tasks 50 --out benchmarks/results

Batches are synthetic with the real shapes (hf.batch.SyntheticSampler): throughput does not depend on the values.
FLOPs: ~2.4 GFLOP per sequence forward+backward at the paper preset (75 tokens), so a step over MT50 x 8
sequences is ~0.96 TFLOP; on this 2-core CPU (0.17-0.33 TFLOP/s fp32) that is seconds per step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harmodt_fast as hf  # noqa: E402
from harmodt_fast.batch import SyntheticSampler  # noqa: E402
from harmodt_fast.trainer import Trainer  # noqa: E402
from published_baseline import PublishedProcedure  # noqa: E402


def timed(fn, min_steps: int, max_seconds: float) -> tuple[float, int]:
    fn()  # warm-up
    t0, n = time.perf_counter(), 0
    while n < min_steps or (time.perf_counter() - t0 < max_seconds and n < 50):
        fn()
        n += 1
        if time.perf_counter() - t0 > max_seconds and n >= 1:
            break
    return (time.perf_counter() - t0) / n, n


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0, help="time budget per measurement")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--skip-published-mask-update", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def trainer(**kw):
        cfg = hf.HarmoDTConfig.from_preset(args.preset, num_tasks=args.tasks, **kw)
        return Trainer(cfg, SyntheticSampler(cfg, device=device), tempfile.mkdtemp(), device, "synthetic"), cfg

    for label, kw in [("ours mixed fp32", dict(precision="fp32")),
                      ("ours mixed bf16 autocast", dict(precision="bf16")),
                      ("ours round-robin fp32", dict(precision="fp32", schedule="round-robin"))]:
        tr, cfg = trainer(**kw)
        sec, n = timed(tr._train_step, 2, args.seconds)
        seqs = cfg.batch_per_task * (1 if cfg.schedule == "round-robin" else cfg.num_tasks)
        rows.append({"path": label, "s_per_step": sec, "steps_timed": n, "sequences_per_s": seqs / sec})
        print(rows[-1], flush=True)
        if label == "ours mixed fp32":
            mask_sec, mask_n = timed(tr._mask_update, 1, args.seconds)
            rows.append({"path": "ours mask update (1 backward + harmony_update)", "s_per_update": mask_sec,
                         "updates_timed": mask_n, "harmony_backend": hf.ops.last_backend("harmony_update")})
            print(rows[-1], flush=True)

    cfg = hf.HarmoDTConfig.from_preset(args.preset, num_tasks=args.tasks)
    sampler = SyntheticSampler(cfg)
    for label, amp in [("fp32", None), ("bf16 autocast", torch.bfloat16)]:
        pub = PublishedProcedure(cfg, amp_dtype=amp)
        state = {"t": 0}

        def pub_step():
            t = state["t"] % cfg.num_tasks
            state["t"] += 1
            pub.train_step(sampler.sample(task=t), t)

        sec, n = timed(pub_step, 2, args.seconds)
        rows.append({"path": f"published procedure (re-implemented) {label}", "s_per_step": sec, "steps_timed": n,
                     "sequences_per_s": cfg.batch_per_task / sec})
        print(rows[-1], flush=True)
    if not args.skip_published_mask_update:
        batches = [sampler.sample(task=t) for t in range(cfg.num_tasks)]
        t0 = time.perf_counter()
        pub.mask_update(batches, k=100)
        rows.append({"path": "published mask update (T backwards + top-k)", "s_per_update": time.perf_counter() - t0,
                     "updates_timed": 1})
        print(rows[-1], flush=True)

    base = {p: next(r for r in rows if r["path"] == f"published procedure (re-implemented) {p}")["sequences_per_s"]
            for p in ("fp32", "bf16 autocast")}
    for r in rows:
        if "sequences_per_s" in r:
            r["x_published_fp32"] = r["sequences_per_s"] / base["fp32"]
            r["x_published_bf16"] = r["sequences_per_s"] / base["bf16 autocast"]
    meta = {
        "benchmark": "train_step", "preset": args.preset, "num_tasks": args.tasks,
        "batch_per_task": cfg.batch_per_task, "tokens_per_sequence": cfg.tokens_per_sequence,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_train_step.py " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_step_{device.type}_{args.preset}_T{args.tasks}_{meta['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(f"# Training step, {args.preset} preset, {args.tasks} tasks x {cfg.batch_per_task} sequences\n\n")
        f.write(f"{meta['device']}, torch {meta['torch']}, {meta['date']}\n\n"
                "| path | s/step or update | sequences/s | x published fp32 | x published bf16 |\n|---|---|---|---|---|\n")
        for r in rows:
            sec = r.get("s_per_step", r.get("s_per_update"))
            f.write(f"| {r['path']} | {sec:.3f} | {r.get('sequences_per_s', float('nan')):.1f} | "
                    f"{r.get('x_published_fp32', float('nan')):.2f} | {r.get('x_published_bf16', float('nan')):.2f} |\n")
    print("wrote", stem + ".json")


def test_train_step_tiny(benchmark):
    """pytest-benchmark entry (run with: pytest benchmarks/bench_train_step.py --benchmark-enable)."""
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=5)
    tr = Trainer(cfg, SyntheticSampler(cfg), tempfile.mkdtemp(), torch.device("cpu"), "synthetic")
    benchmark(tr._train_step)


if __name__ == "__main__":
    main()
