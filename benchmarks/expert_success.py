"""Success rate of the "expert" collection level on every MT50 task (the README's table comes from its output).

Per task: `--episodes` episodes (default 10) on goal variants 0..n-1, 500 steps each, the scripted policy with the
expert level's action noise N(0, 0.1^2) (exactly the collector's episode runner, p = 1); an episode succeeds if
info["success"] is ever true. `--no-noise` adds a column for the bare scripted policy (Meta-World's own tests
expect >= 80% from each).

    python -m harmodt_fast.benchmarks.expert_success --workers 2   # writes benchmarks/results/expert_success_mt50.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np


def _task_stats(job):
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from harmodt_fast.data import collection

    task, episodes, seed, noise_free = job
    runner = collection._runner(task)
    out = {"task": task}
    t0 = time.perf_counter()
    steps = 0
    levels = [("expert", collection.EXPERT_NOISE)] + ([("scripted", 0.0)] if noise_free else [])
    for name, sigma in levels:
        returns, success = [], []
        for g in range(episodes):
            rng = collection.episode_rng(seed, task, g)
            if sigma == 0.0:
                # the same runner with the noise draws scaled to zero: bare scripted actions
                rng = _ZeroNoise(rng)
            ep = runner.run(1.0, rng, 500, goal_index=g)
            returns.append(float(ep["rewards"].sum(dtype=np.float64)))
            success.append(bool(ep["success"].any()))
            steps += len(ep["rewards"])
        out[name] = {"success_rate": float(np.mean(success)), "mean_return": float(np.mean(returns)),
                     "successes": success}
    out["steps"] = steps
    out["seconds"] = time.perf_counter() - t0
    return out


class _ZeroNoise:
    """Wraps a Generator so that normal() returns zeros (everything else unchanged)."""

    def __init__(self, rng):
        self._rng = rng

    def normal(self, loc, scale, size):
        return np.zeros(size)

    def __getattr__(self, name):
        return getattr(self._rng, name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-noise", action="store_true", help="also run the bare scripted policy")
    ap.add_argument("--tasks", default="MT50")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "expert_success_mt50.json"))
    args = ap.parse_args(argv)

    from harmodt_fast.tasks import resolve_tasks

    tasks = resolve_tasks(args.tasks)
    jobs = [(t, args.episodes, args.seed, args.no_noise) for t in tasks]
    t0 = time.time()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = list(pool.imap(_task_stats, jobs))
    else:
        results = [_task_stats(j) for j in jobs]
    wall = time.time() - t0
    from importlib.metadata import version

    per_task = {r["task"]: {k: v for k, v in r.items() if k != "task"} for r in results}
    summary = {"mean_success_expert": float(np.mean([r["expert"]["success_rate"] for r in results])),
               "tasks_below_80pct_expert": [r["task"] for r in results if r["expert"]["success_rate"] < 0.8]}
    if args.no_noise:
        summary["mean_success_scripted"] = float(np.mean([r["scripted"]["success_rate"] for r in results]))
        summary["tasks_below_80pct_scripted"] = [r["task"] for r in results if r["scripted"]["success_rate"] < 0.8]
    steps = sum(r["steps"] for r in results)
    report = {
        "what": "success of the expert collection level (scripted policy + N(0, 0.1^2) action noise) per MT50 task; "
                "goal variants 0..episodes-1, 500 steps, success = info['success'] ever true",
        "episodes_per_task": args.episodes,
        "seed": args.seed,
        "summary": summary,
        "tasks": per_task,
        "env_steps": steps,
        "env_steps_per_s_per_worker": steps / sum(r["seconds"] for r in results),
        "wall_seconds": wall,
        "workers": args.workers,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "metaworld": version("metaworld"),
                     "mujoco": version("mujoco"), "numpy": np.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for r in results:
        line = f"{r['task']:32s} expert {100 * r['expert']['success_rate']:5.1f}%"
        if args.no_noise:
            line += f"   scripted {100 * r['scripted']['success_rate']:5.1f}%"
        print(line)
    print(json.dumps(summary))
    print(f"wrote {args.out} ({steps} steps in {wall:.0f} s)")


if __name__ == "__main__":
    main()
