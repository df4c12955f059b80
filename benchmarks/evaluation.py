"""Evaluation throughput: MT50 x 10 episodes with the paper model, our batched evaluator against the published
procedure's loop (one environment at a time, one batch-1 model forward per step, masked weights copied into the
model for every task), side by side in one run.

    python -m harmodt_fast.benchmarks.evaluation --device cpu  --steps 20  --baseline-tasks 5 --baseline-steps 100
    python -m harmodt_fast.benchmarks.evaluation --device cuda --steps 500 --baseline-tasks 5 --baseline-steps 500

The model is the paper preset (5.29M parameters, ERK masks at density 0.8) with UNTRAINED weights, random prompts
and identity state normalisation: throughput does not depend on the weights' values (every episode runs its full
step count whatever the actions), success rates of this model are meaningless and not reported as results.

What is measured and how it is extrapolated to the full protocol (50 tasks x 10 episodes x 500 steps = 250,000
environment steps) when a run covers fewer steps:
- ours: hf.evaluate on all 50 tasks x 10 episodes (all 500 environments open, one batched forward of up to 500 rows
  per step) for --steps steps. Every step does the same work (the context window is always K=20 wide, padded or
  not), so full time = setup (worker start + building 500 environments) + rollout time x 500 / steps.
- published loop: --baseline-tasks tasks spread over MT50, one episode each, --baseline-steps steps; per task
  Meta-World's MT1 set-up and the masked weights copied into an unmasked model (deep copy of the state dict,
  W * float mask per weight, load), then per step the history tensors grow by torch.cat, the last K steps are
  left-padded into a batch of one and the model runs once. Full time = 50 x (task set-up) + 500 x (environment
  build + reset) + 250,000 x (mean step time).
  The published code runs fp32; the loop is also timed under bf16 autocast, to separate what batching gains from
  what the precision gains.
Timings are wall clock; the 1-minute load average before and after each part is recorded, since the machines of
this project are shared.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import harmodt_fast as hf
import harmodt_fast.envs
from harmodt_fast.batch import Batch, synthetic_batch
from harmodt_fast.checkpoint import (CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint, prompt_from_dict,
                                     prompt_to_dict, save_atomic)
from harmodt_fast.envs import MAX_EPISODE_STEPS, goal_variants, make_env

FULL_TASKS, FULL_EPISODES = 50, 10
FULL_STEPS = FULL_TASKS * FULL_EPISODES * MAX_EPISODE_STEPS


def paper_checkpoint(path: str, tasks: list[str]) -> str:
    cfg = hf.HarmoDTConfig.from_preset("paper", tasks=tasks)
    torch.manual_seed(0)
    model = hf.HarmoDT(cfg)
    T = len(tasks)
    prompt = synthetic_batch(cfg, 1, torch.Generator().manual_seed(0)).prompt
    ckpt = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": model.state_dict(), "step": 0,
            "tasks": tasks, "state_mean": torch.zeros(T, 39), "state_std": torch.ones(T, 39),
            "eval_prompts": prompt_to_dict(prompt), "dataset_fingerprint": "untrained-benchmark"}
    return save_atomic(ckpt, path)


# ---- the published procedure's evaluation loop (our re-implementation) ---------------------------------------------
def published_task_model(masked_model, base, task: int):
    """What the published code does before evaluating a task: W * M_t copied into the model's weights."""
    masks = masked_model.task_masks()
    state = copy.deepcopy({k: v for k, v in masked_model.state_dict().items() if not k.endswith("masks_packed")})
    for name in masks.names:
        state[name] = state[name] * masks.to_dense(name, task).to(state[name].dtype)
    base.load_state_dict(state)
    return base


def published_episode(model, config, prompt, task: str, goal: int, steps: int, device, amp) -> tuple[float, float, int]:
    """One episode the published way; returns (seconds building the env, seconds stepping, steps)."""
    t0 = time.perf_counter()
    env = make_env(task, goal)
    obs, _ = env.reset()
    t1 = time.perf_counter()
    K, scale = config.context, config.rtg_scale
    states = torch.as_tensor(obs, dtype=torch.float32, device=device).reshape(1, 39)
    actions = torch.zeros((0, 4), device=device)
    rtg = torch.tensor([[config.target_return / scale]], device=device)
    timesteps = torch.zeros((1, 1), dtype=torch.int64, device=device)
    offsets = torch.tensor([0, 1])
    for t in range(steps):
        actions = torch.cat([actions, torch.zeros((1, 4), device=device)])
        k = min(K, states.shape[0])
        pad = K - k
        s = torch.cat([torch.zeros(pad, 39, device=device), states[-k:]])[None]
        a = torch.cat([torch.zeros(pad, 4, device=device), actions[-k:]])[None]
        r = torch.cat([torch.zeros(pad, device=device), rtg[0, -k:]])[None, :, None]
        ts = torch.cat([torch.zeros(pad, dtype=torch.int64, device=device), timesteps[0, -k:]])[None]
        mask = torch.cat([torch.zeros(pad, dtype=torch.bool, device=device), torch.ones(k, dtype=torch.bool, device=device)])[None]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            action = model(Batch(s, a, r, ts, mask, task_offsets=offsets, prompt=prompt))[0, -1].float()
        actions[-1] = action
        obs, reward, _, _, _ = env.step(action.cpu().numpy().astype(np.float64))
        states = torch.cat([states, torch.as_tensor(obs, dtype=torch.float32, device=device).reshape(1, 39)])
        rtg = torch.cat([rtg, (rtg[0, -1] - reward / scale).reshape(1, 1)], dim=1)
        timesteps = torch.cat([timesteps, torch.full((1, 1), t + 1, dtype=torch.int64, device=device)], dim=1)
    env.close()
    return t1 - t0, time.perf_counter() - t1, steps


def run_published(ckpt_path: str, tasks: list[str], n_tasks: int, steps: int, device, amp: bool = False) -> dict:
    ckpt = load_checkpoint(ckpt_path)
    masked, cfg = model_from_checkpoint(ckpt, device=device)
    base = hf.HarmoDT(hf.HarmoDTConfig.from_dict({**cfg.to_dict(), "method": "prompt-dt"})).to(device).eval()
    prompts = prompt_from_dict(ckpt["eval_prompts"])
    picks = [int(i) for i in np.linspace(0, len(tasks) - 1, n_tasks).round()]
    harmodt_fast.envs._benchmark.cache_clear()  # every timed loop pays its own MT1 set-up
    switch_s, build_s, step_s, n_steps = [], [], 0.0, 0
    for t in picks:
        t0 = time.perf_counter()
        goal_variants(tasks[t])  # Meta-World's MT1 set-up, once per task (cached after), not per episode
        model = published_task_model(masked, base, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        switch_s.append(time.perf_counter() - t0)
        prompt = hf.Prompt(**{f: v[t : t + 1] for f, v in vars(prompts).items()}).to(device)
        b, s, n = published_episode(model, cfg, prompt, tasks[t], 0, steps, device, amp)
        build_s.append(b)
        step_s += s
        n_steps += n
    per_step = step_s / n_steps
    full = FULL_TASKS * np.mean(switch_s) + FULL_TASKS * FULL_EPISODES * np.mean(build_s) + FULL_STEPS * per_step
    return {"precision": "bf16" if amp else "fp32", "tasks": [tasks[t] for t in picks], "episodes_per_task": 1,
            "steps_per_episode": steps,
            "task_setup_s_per_task": float(np.mean(switch_s)),  # MT1 set-up + mask copy
            "env_build_s_per_episode": float(np.mean(build_s)),
            "s_per_step": per_step, "env_steps_per_s": 1.0 / per_step,
            "full_mt50x10_s_extrapolated": float(full)}


def run_ours(ckpt_path: str, steps: int, device: str, precision: str, workers, backend, episodes: int) -> dict:
    t0 = time.perf_counter()
    report = hf.evaluate(ckpt_path, episodes=episodes, max_episode_steps=steps, device=device,
                         precision=precision, workers=workers, backend=backend, progress=True)
    wall = time.perf_counter() - t0
    scale = MAX_EPISODE_STEPS / steps
    full = report["setup_s"] + report["rollout_s"] * scale
    keep = ("env_steps", "env_steps_per_s", "setup_s", "rollout_s", "model_s", "env_s", "model_calls",
            "max_rows_per_call", "workers", "device", "precision", "masked_linear_backend", "model_time_share",
            "model_share_of_rollout", "wall_s")
    out = {k: report[k] for k in keep}
    out.update({"episodes_per_task": episodes, "steps_per_episode": steps, "measured_wall_s": wall,
                "model_s_per_step": report["model_s"] / steps, "env_s_per_step": report["env_s"] / steps})
    if episodes == FULL_EPISODES and report["tasks"] == list(hf.TASK_SETS["MT50"]):  # 500 rows only
        out.update({"full_mt50x10_s_extrapolated": full,
                    "full_env_steps_per_s_extrapolated": FULL_STEPS / (report["rollout_s"] * scale),
                    "full_model_share_extrapolated": report["model_s"] * scale / full})
    return out


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process (the environment workers are not its children: forkserver)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime, 0.0


def measured(fn, *args):
    (s0, c0), w0, l0 = cpu_seconds(), time.perf_counter(), os.getloadavg()[0]
    out = fn(*args)
    (s1, c1), w1 = cpu_seconds(), time.perf_counter()
    out.update({"part_wall_s": w1 - w0, "part_cpu_s_main_process": s1 - s0,
                "load_avg_1min_before_after": [l0, os.getloadavg()[0]]})
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20, help="steps per episode measured for ours (500 = full)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--backend", default=None, help="masked_linear backend (default: auto)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--episodes", type=int, default=FULL_EPISODES, help="ours: episodes per task (10 = the protocol; "
                   "fewer only for a dry run, then nothing is extrapolated)")
    p.add_argument("--baseline-tasks", type=int, default=5)
    p.add_argument("--baseline-steps", type=int, default=100)
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--tasks", default="MT50", help="task set or comma-separated names (MT50 = the protocol; fewer "
                   "only for a dry run)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    from harmodt_fast.tasks import resolve_tasks

    tasks = list(resolve_tasks(args.tasks))
    result = {"benchmark": "evaluation MT50 x 10 episodes, paper model (untrained weights)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "device": str(dev), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = paper_checkpoint(os.path.join(tmp, "checkpoint.pt"), tasks)
        if not args.skip_baseline:
            print(f"published loop: {args.baseline_tasks} tasks x 1 episode x {args.baseline_steps} steps", flush=True)
            result["published_loop"] = measured(run_published, ckpt, tasks, args.baseline_tasks,
                                                args.baseline_steps, dev)
            print(json.dumps(result["published_loop"], indent=1), flush=True)
            # the same loop under bf16 autocast: separates what batching gains from what the precision gains
            result["published_loop_bf16"] = measured(run_published, ckpt, tasks, args.baseline_tasks,
                                                     args.baseline_steps, dev, True)
            print(json.dumps(result["published_loop_bf16"], indent=1), flush=True)
        if not args.skip_ours:
            print(f"ours: {len(tasks)} tasks x {args.episodes} episodes x {args.steps} steps", flush=True)
            result["ours"] = measured(run_ours, ckpt, args.steps, str(dev), args.precision, args.workers,
                                      args.backend, args.episodes)
            print(json.dumps(result["ours"], indent=1), flush=True)
    if "full_mt50x10_s_extrapolated" in result.get("ours", {}) and "published_loop" in result:
        result["speedup_full_extrapolated"] = (result["published_loop"]["full_mt50x10_s_extrapolated"]
                                               / result["ours"]["full_mt50x10_s_extrapolated"])
        result["speedup_vs_published_loop_in_bf16"] = (result["published_loop_bf16"]["full_mt50x10_s_extrapolated"]
                                                       / result["ours"]["full_mt50x10_s_extrapolated"])
        print(f"full MT50 x 10 (extrapolated): ours {result['ours']['full_mt50x10_s_extrapolated']:.0f} s, "
              f"published loop {result['published_loop']['full_mt50x10_s_extrapolated']:.0f} s, "
              f"speed-up {result['speedup_full_extrapolated']:.2f}x")
    result["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"evaluation_{dev.type}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
