"""Sampler throughput: MultiTaskSampler.sample() against a per-sample Python loop like the published code's.

The baseline follows the procedure of the published Prompt-DT / HarmoDT data loading (re-implemented here, not
copied): for every task, for each of its B rows, draw an episode (probability proportional to its length) and a
start, slice the arrays, compute the return-to-go with a Python loop over the rest of the episode (a discounted
cumulative sum with gamma = 1), pad each field by concatenation, normalise, then draw a prompt episode and do the
same for its last steps; finally concatenate everything and convert to torch tensors.

The dataset is synthetic with the shape of the real one (MT50, 500-step episodes, 39-dim states); its episode
count only changes memory, not the cost per batch of either path (default 200 episodes per task, 5M transitions;
--episodes 2000 gives the paper's 50M). Batch shape: the paper's (8 rows per task, K = 20, prompt 5) for MT50.

    python -m harmodt_fast.benchmarks.sampler                # CPU, writes benchmarks/results/sampler_cpu_<date>.json
    python -m harmodt_fast.benchmarks.sampler --device cuda  # device-resident mode on a GPU (sampler_cuda_<date>.json)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

import numpy as np
import torch

import harmodt_fast as hf
from harmodt_fast.data import MultiTaskSampler
from harmodt_fast.data.dataset import TaskData


class SyntheticDataset:
    """MT50-shaped random data held in memory (the loader's interface: .tasks, .arrays, .episodes)."""

    def __init__(self, tasks, episodes, steps, seed=0):
        self.tasks = list(tasks)
        rng = np.random.default_rng(seed)
        self._data = {}
        for t in self.tasks:
            n = episodes * steps
            self._data[t] = TaskData(
                observations=rng.standard_normal((n, 39), dtype=np.float32),
                actions=rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                rewards=rng.uniform(0, 10, n).astype(np.float32),
                dones=np.zeros(n, bool), success=np.zeros(n, bool),
                episode_starts=np.arange(episodes + 1, dtype=np.int64) * steps)

    def arrays(self, task):
        return self._data[task]

    def episodes(self, task):
        d = self._data[task]
        return [{f: getattr(d, f)[d.episode_starts[e]:d.episode_starts[e + 1]]
                 for f in ("observations", "actions", "rewards", "dones", "success")}
                for e in range(d.num_episodes)]


def discount_cumsum(x, gamma):
    out = np.zeros_like(x)
    out[-1] = x[-1]
    for t in reversed(range(x.shape[0] - 1)):
        out[t] = x[t] + gamma * out[t + 1]
    return out


class PublishedStyleLoader:
    """Per-sample Python loop over trajectories (dicts of arrays), as the published code builds a batch."""

    def __init__(self, ds, cfg, sampler):
        self.cfg = cfg
        self.trajs, self.prompts, self.p_sample, self.mean, self.std = [], [], [], [], []
        for t, task in enumerate(sampler.tasks):
            eps = ds.episodes(task)
            train = [eps[i] for i in sampler.train_episodes[task]]
            self.trajs.append(train)
            self.prompts.append([eps[i] for i in sampler.prompt_episodes[task]])
            lens = np.array([len(e["rewards"]) for e in train], dtype=np.float64)
            self.p_sample.append(lens / lens.sum())
            self.mean.append(sampler.state_mean[t].numpy())
            self.std.append(sampler.state_std[t].numpy())

    def _segment(self, traj, si, max_len, t):
        cfg = self.cfg
        s = traj["observations"][si:si + max_len].reshape(1, -1, 39)
        a = traj["actions"][si:si + max_len].reshape(1, -1, 4)
        r = traj["rewards"][si:si + max_len].reshape(1, -1, 1)
        d = traj["dones"][si:si + max_len].reshape(1, -1)
        tlen = s.shape[1]
        ts = np.arange(si, si + tlen).reshape(1, -1)
        ts[ts >= cfg.max_ep_len] = cfg.max_ep_len - 1
        rtg = discount_cumsum(traj["rewards"][si:], gamma=1.0)[: tlen + 1].reshape(1, -1, 1)
        if rtg.shape[1] <= tlen:
            rtg = np.concatenate([rtg, np.zeros((1, 1, 1))], axis=1)
        s = np.concatenate([np.zeros((1, max_len - tlen, 39)), s], axis=1)
        s = (s - self.mean[t]) / self.std[t]
        a = np.concatenate([np.ones((1, max_len - tlen, 4)) * -10.0, a], axis=1)
        r = np.concatenate([np.zeros((1, max_len - tlen, 1)), r], axis=1)
        d = np.concatenate([np.ones((1, max_len - tlen)) * 2, d], axis=1)
        rtg = np.concatenate([np.zeros((1, max_len - tlen, 1)), rtg], axis=1) / self.cfg.rtg_scale
        ts = np.concatenate([np.zeros((1, max_len - tlen)), ts], axis=1)
        mask = np.concatenate([np.zeros((1, max_len - tlen)), np.ones((1, tlen))], axis=1)
        return s, a, r, d, rtg, ts, mask

    def _to_torch(self, parts):
        s, a, r, d, rtg, ts, mask = (np.concatenate(x, axis=0) for x in zip(*parts))
        return (torch.from_numpy(s).float(), torch.from_numpy(a).float(), torch.from_numpy(r).float(),
                torch.from_numpy(d).long(), torch.from_numpy(rtg[:, :-1] if rtg.shape[1] > s.shape[1] else rtg).float(),
                torch.from_numpy(ts).long(), torch.from_numpy(mask))

    def get_batch(self):
        cfg = self.cfg
        rows, prompts = [], []
        for t in range(len(self.trajs)):
            inds = np.random.choice(len(self.trajs[t]), size=cfg.batch_per_task, replace=True, p=self.p_sample[t])
            for i in range(cfg.batch_per_task):
                traj = self.trajs[t][int(inds[i])]
                si = random.randint(0, traj["rewards"].shape[0] - 1)
                rows.append(self._segment(traj, si, cfg.context, t))
                ptraj = self.prompts[t][random.randrange(len(self.prompts[t]))]
                psi = max(0, ptraj["rewards"].shape[0] - cfg.prompt_len - 1)
                prompts.append(self._segment(ptraj, psi, cfg.prompt_len, t))
        return self._to_torch(rows), self._to_torch(prompts)


def timeit(fn, min_seconds, sync=lambda: None):
    """(median wall seconds, median process CPU seconds, calls): CPU time is what the work costs, wall time
    also counts waiting for cores other processes hold (intra-op threads wait for each other on a busy machine)."""
    for _ in range(3):
        fn()
    sync()
    walls, cpus = [], []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(walls) < 5:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), len(walls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--episodes", type=int, default=200, help="episodes per task (memory only)")
    ap.add_argument("--steps", type=int, default=500, help="steps per episode")
    ap.add_argument("--seconds", type=float, default=5.0, help="minimum timing window per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    tasks = hf.TASK_SETS["MT50"][: args.tasks]
    cfg = hf.HarmoDTConfig.from_preset("paper", tasks=tasks)  # 8 rows per task, K = 20, prompt 5
    t0 = time.perf_counter()
    ds = SyntheticDataset(tasks, args.episodes, args.steps)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampler = MultiTaskSampler(ds, cfg, device=args.device, seed=0)
    sync = (lambda: torch.cuda.synchronize()) if sampler.device.type == "cuda" else (lambda: None)
    sync()
    t_build = time.perf_counter() - t0

    fast, fast_cpu, n_fast = timeit(sampler.sample, args.seconds, sync)
    one_task, _, _ = timeit(lambda: sampler.sample(task=len(tasks) // 2), args.seconds / 2, sync)
    baseline = PublishedStyleLoader(ds, cfg, sampler)
    random.seed(0)
    np.random.seed(0)
    slow, slow_cpu, n_slow = timeit(baseline.get_batch, args.seconds)
    rows = cfg.batch_per_task * len(tasks)
    report = {
        "what": "batches/s of one MT50 training batch (all tasks) at the paper's batch shape",
        "batch": {"tasks": len(tasks), "rows_per_task": cfg.batch_per_task, "rows": rows, "context": cfg.context,
                  "prompt_len": cfg.prompt_len},
        "dataset": {"episodes_per_task": args.episodes, "steps_per_episode": args.steps,
                    "transitions": sampler.num_transitions, "synthetic": True},
        "device": str(sampler.device),
        "sampler_batches_per_s": 1.0 / fast,
        "sampler_ms_per_batch": fast * 1e3,
        "sampler_one_task_ms": one_task * 1e3,
        "baseline_batches_per_s": 1.0 / slow,
        "baseline_ms_per_batch": slow * 1e3,
        "speedup": slow / fast,
        "sampler_cpu_ms_per_batch": fast_cpu * 1e3,
        "baseline_cpu_ms_per_batch": slow_cpu * 1e3,
        "speedup_cpu_time": slow_cpu / fast_cpu if fast_cpu > 0 else None,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "samples": {"sampler": n_fast, "baseline": n_slow},
        "sampler_build_seconds": t_build,
        "synthetic_data_seconds": t_data,
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if sampler.device.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "harmodt_fast": hf.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m harmodt_fast.benchmarks.sampler " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"sampler_{sampler.device.type}_{datetime.date.today().isoformat()}_t{torch.get_num_threads()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"sampler   {report['sampler_ms_per_batch']:8.2f} ms/batch  {report['sampler_batches_per_s']:8.1f} batches/s"
          f"  (one task: {report['sampler_one_task_ms']:.2f} ms)")
    print(f"baseline  {report['baseline_ms_per_batch']:8.2f} ms/batch  {report['baseline_batches_per_s']:8.1f} batches/s")
    print(f"cpu time  sampler {report['sampler_cpu_ms_per_batch']:.2f} ms, baseline "
          f"{report['baseline_cpu_ms_per_batch']:.2f} ms per batch; load average {report['load_average_1min']}")
    print(f"speedup   {report['speedup']:.1f}x   ({rows} rows, {sampler.num_transitions} transitions, build "
          f"{t_build:.1f} s)   wrote {out}")


if __name__ == "__main__":
    main()
