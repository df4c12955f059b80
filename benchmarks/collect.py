"""Collection speed: env steps/s per worker of `hf.collect` next to a bare env-step loop with the scripted policy.

Bare loop: make_env, reset, 500 x (policy.get_action, clip, env.step), nothing recorded. Collector: hf.collect with
workers=1 (in process) on the same tasks, timed inside the worker (env creation excluded, recording and noise
included); the "expert" level calls the policy every step, "near-optimal" on a share p_i of the steps.

    python -m harmodt_fast.benchmarks.collect      # writes benchmarks/results/collect_speed_<date>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import numpy as np

TASKS = ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-close-v3", "assembly-v3"]


def bare_loop(task, episodes):
    from harmodt_fast.envs import make_env, scripted_policy

    env, policy = make_env(task, 0), scripted_policy(task)
    steps, seconds = 0, 0.0
    for _ in range(episodes):
        obs, _ = env.reset()
        t0 = time.perf_counter()
        for _ in range(500):
            obs, r, term, trunc, info = env.step(np.clip(policy.get_action(obs), -1.0, 1.0))
            steps += 1
            if term or trunc:
                break
        seconds += time.perf_counter() - t0
    return steps / seconds


def main(argv=None):
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=4, help="episodes per task for each measurement")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import harmodt_fast as hf
    from harmodt_fast.data.dataset import read_manifest

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            row = {"bare_steps_per_s": bare_loop(task, args.episodes)}
            for quality in ("expert", "near-optimal"):
                path = hf.collect([task], os.path.join(tmp, f"{task}-{quality}"), args.episodes, quality=quality,
                                  workers=1, progress=False, verbose=False)
                row[f"collect_{quality}_steps_per_s"] = read_manifest(path)["collection_env_steps_per_s_per_worker"]
            rows[task] = row
            print(f"{task:20s} bare {row['bare_steps_per_s']:7.0f}   collect expert "
                  f"{row['collect_expert_steps_per_s']:7.0f}   near-optimal {row['collect_near-optimal_steps_per_s']:7.0f}"
                  "  steps/s")
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
    mean["collect_expert_over_bare"] = mean["collect_expert_steps_per_s"] / mean["bare_steps_per_s"]
    print(json.dumps(mean))
    from importlib.metadata import version

    report = {
        "what": "env steps/s on one core: bare scripted-policy loop vs hf.collect (workers=1, in-worker timing)",
        "episodes_per_task": args.episodes, "tasks": rows, "mean": mean,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "metaworld": version("metaworld"),
                     "mujoco": version("mujoco"), "numpy": np.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"collect_speed_{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
