"""What the replay-like ramp looks like: success rate and return of episodes at expert-action probability p.

Near-optimal data spans p = 0..1 and sub-optimal data p = 0..0.5 (see the README, "Datasets"). Per task and p:
`--episodes` episodes (goal variants 0..n-1), 500 steps, the collector's own episode runner.

    python -m harmodt_fast.benchmarks.quality_ramp        # writes benchmarks/results/quality_ramp_mt5.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import warnings

import numpy as np


def main(argv=None):
    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="MT5")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--probs", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "quality_ramp_mt5.json"))
    args = ap.parse_args(argv)
    from harmodt_fast.data import collection
    from harmodt_fast.tasks import resolve_tasks

    probs = [float(p) for p in args.probs.split(",")]
    tasks = resolve_tasks(args.tasks)
    table = {}
    for task in tasks:
        runner = collection._runner(task)
        table[task] = {}
        for p in probs:
            succ, ret = [], []
            for g in range(args.episodes):
                ep = runner.run(p, collection.episode_rng(0, task, g), 500, goal_index=g)
                succ.append(bool(ep["success"].any()))
                ret.append(float(ep["rewards"].sum(dtype=np.float64)))
            table[task][str(p)] = {"success_rate": float(np.mean(succ)), "mean_return": float(np.mean(ret))}
        print(task, {p: (round(v["success_rate"], 2), round(v["mean_return"])) for p, v in table[task].items()})
    mean = {str(p): {"success_rate": float(np.mean([table[t][str(p)]["success_rate"] for t in tasks])),
                     "mean_return": float(np.mean([table[t][str(p)]["mean_return"] for t in tasks]))} for p in probs}
    print("mean", {p: (round(v["success_rate"], 2), round(v["mean_return"])) for p, v in mean.items()})
    from importlib.metadata import version

    report = {"what": "success rate and mean return of episodes at expert-action probability p (goal variants "
                      "0..episodes-1, 500 steps, expert noise 0.1, uniform random actions otherwise)",
              "episodes": args.episodes, "tasks": table, "mean_over_tasks": mean,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "versions": {"python": platform.python_version(), "metaworld": version("metaworld"),
                           "numpy": np.__version__},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
