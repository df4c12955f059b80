"""Scale: the mask update and the training step against the task count, and end-to-end runs at hundreds of tasks.

    python -m harmodt_fast.benchmarks.scale                         # every CPU case; resumes: done cases are skipped
    python -m harmodt_fast.benchmarks.scale --only sweep            # or: runs, or one case name
    python -m harmodt_fast.benchmarks.scale --device cuda --sweep-preset large --tasks 50,160    # on a GPU

Every case runs in a fresh subprocess (its peak memory is its own, a kill loses only that case) and appends one
JSON line to OUT/results.jsonl when it ends; a rerun skips the cases already there. Afterwards OUT/results.md
and OUT/scale.png are rendered from that file.

Cases:
- sweep (synthetic batches, bf16 autocast where the CPU has it, dropout 0, 1 sequence per task): a model of
  reduced width (hidden 256, 3 layers, MLP 1024: 2,359,296 masked weights; --sweep-preset for another) at
  T = 5, 50, 160, 320 (--tasks):
    step             one mixed training step (after one warm-up step)
    update-whole     the whole-buffer mask update: every task's gradient in one float32 [T, P] buffer
    update-streamed  the streamed mask update (G = min(the rows that fit 256 MB, T - 1) tasks at a time, two passes)
  Time: wall clock of the call; memory: the peak extra bytes of the call (benchmarks/measure.py). The two
  updates start from the same model and batch: "same masks" compares the sha256 of their new masks.
- runs (hf.train end to end on synthetic data whose task names are not Meta-World's, written once to
  SCRATCH/data_T<T>): the paper model over 100 tasks, with streamed updates, without updates (mask_interval past
  the last step) and with the whole-buffer update; and a 320-task run of a 19M-masked-weight model (hidden 512,
  6 layers, MLP 2048) with streamed updates. Memory: the peak extra bytes of the whole hf.train call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

from harmodt_fast.benchmarks.measure import machine, measure

HERE = os.path.dirname(os.path.abspath(__file__))

SWEEP_MODEL = dict(hidden=256, layers=3, heads=8, mlp_hidden=1024)
RUNS = {
    # name: (model, tasks, hf.train overrides)
    "run-paper-T100-streamed": ("paper", 100, dict(mask_interval=2)),
    "run-paper-T100-no-update": ("paper", 100, dict(mask_interval=1000)),
    "run-paper-T100-whole": ("paper", 100, dict(mask_interval=2, mask_update_memory_mb=1e6)),
    "run-19M-T320-streamed": (dict(hidden=512, layers=6, heads=8, mlp_hidden=2048), 320,
                              dict(mask_interval=2, batch_per_task=1)),
}
RUN_SETTINGS = dict(steps=4, batch_per_task=2, warmup_steps=2, log_every=1, checkpoint_every=1000, eval_every=0)


def synthetic_data(root: str, tasks: int, episodes: int = 3, steps: int = 40, seed: int = 0) -> str:
    """MTDiff-layout episodes for `tasks` tasks named scale-task-000.. (state 39, action 4), written once."""
    import numpy as np

    folder = os.path.join(root, f"data_T{tasks}")
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    rng = np.random.default_rng(seed)
    for t in range(tasks):
        task_dir = os.path.join(folder, f"scale-task-{t:03d}")
        os.makedirs(task_dir, exist_ok=True)
        for e in range(episodes):
            np.savez(os.path.join(task_dir, f"{e}.npz"),
                     observations=rng.normal(size=(steps, 39)).astype(np.float32),
                     actions=rng.uniform(-1, 1, size=(steps, 4)).astype(np.float32),
                     rewards=rng.uniform(0, 10, size=steps).astype(np.float32),
                     dones=np.eye(1, steps, steps - 1, dtype=bool).reshape(steps))
    open(done, "w").close()
    return folder


# ---- the worker: one case in this process ---------------------------------------------------------------------
def _sweep_case(kind: str, tasks: int, preset: str, device_name: str) -> dict:
    import torch

    from harmodt_fast import method
    from harmodt_fast._ext import load_extension
    from harmodt_fast.batch import SyntheticSampler
    from harmodt_fast.config import HarmoDTConfig
    from harmodt_fast.model import HarmoDT
    from harmodt_fast.runtime import autocast_dtype
    from harmodt_fast.task_gradients import update_group_size

    device = torch.device(device_name)
    model_kw = SWEEP_MODEL if preset == "reduced" else {}
    # dropout 0: the two update forms then see the same gradients, so their masks must be identical (hashed below)
    cfg = HarmoDTConfig.from_preset("paper" if preset == "reduced" else preset, num_tasks=tasks, batch_per_task=1,
                                    dropout=0.0, mask_update_memory_mb=1e9 if kind == "update-whole" else 256.0,
                                    **model_kw)
    if device.type == "cpu":
        load_extension()
    torch.manual_seed(0)
    model = HarmoDT(cfg).to(device)
    P = sum(model.masked_sizes())
    if kind == "update-whole" and device.type == "cuda" and 4 * tasks * P > torch.cuda.mem_get_info(device)[0]:
        return {"skipped": f"the [T, P] buffer ({4 * tasks * P / 2**30:.1f} GiB) exceeds the device's free memory "
                           f"({torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB)"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = SyntheticSampler(cfg, device=device)
    batch = sampler.sample()
    amp = autocast_dtype(cfg, device)
    unused = method.unused_entries(model)

    def step():
        method.inner_step(model, optimizer, batch, cfg, unused, losses_fn=model.task_losses, amp_dtype=amp)

    step()  # warm-up (and the optimiser state exists, as in training)
    if kind == "step":
        fn = step
    else:  # streamed: at most T - 1 tasks per pass, even where every row would fit (its cost at small T)
        group = None if kind == "update-whole" else max(1, min(update_group_size(cfg, P), tasks - 1))

        def fn():
            return method.mask_update(model, batch, cfg, cfg.steps // 2, losses_fn=model.task_losses, amp_dtype=amp,
                                      tasks_per_pass=group)[1]
    times, cpus, peak, out = measure(fn, device, 1)
    rec = {"time_s": times[0], "cpu_s": cpus[0], "peak_extra_bytes": peak, "masked_weights": P,
           "whole_buffer_bytes": 4 * tasks * P, "sequences": batch.num_rows}
    if isinstance(out, dict):
        import hashlib

        masks = model.task_masks()
        digest = hashlib.sha256(b"".join(masks.packed(n).cpu().numpy().tobytes() for n in masks.names)).hexdigest()
        rec.update(flips=out["flips"], tasks_per_pass=out["tasks_per_pass"], passes=out["passes"], masks_sha256=digest)
    return rec


def _run_case(name: str, scratch: str, device_name: str) -> dict:
    import shutil

    import torch

    import harmodt_fast as hf

    model, tasks, overrides = RUNS[name]
    data = synthetic_data(scratch, tasks)
    out = os.path.join(scratch, name)
    shutil.rmtree(out, ignore_errors=True)  # a case is all or nothing: a killed one starts over
    preset, model_kw = (model, {}) if isinstance(model, str) else ("paper", model)
    kw = {**RUN_SETTINGS, **model_kw, **overrides}
    device = torch.device(device_name)
    times, cpus, peak, res = measure(lambda: hf.train(data, out, preset=preset, device=device_name, progress=False,
                                                     **kw), device, 1)
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    updates = [e["mask_update"] for e in log if "mask_update" in e]
    losses = [e["loss"] for e in log if "loss" in e]
    masked = res.masks.numel if res.masks is not None else 0
    return {"time_s": times[0], "cpu_s": cpus[0], "peak_extra_bytes": peak, "tasks": tasks, "steps": res.step,
            "masked_weights": masked, "whole_buffer_bytes": 4 * tasks * masked, "mask_updates": updates,
            "losses": losses, "config": {k: v for k, v in res.config.to_dict().items()
                                         if k in ("hidden", "layers", "mlp_hidden", "batch_per_task", "steps",
                                                  "mask_interval", "mask_update_memory_mb", "precision")}}


def worker(args) -> dict:
    case = json.loads(args.worker)
    if case["kind"] == "run":
        return _run_case(case["name"], args.scratch, args.device)
    return _sweep_case(case["kind"], case["tasks"], args.sweep_preset, args.device)


# ---- the driver -------------------------------------------------------------------------------------------------
def cases(args) -> list[dict]:
    out = []
    if args.only in (None, "sweep") or (args.only or "").startswith("sweep-"):
        for tasks in [int(t) for t in args.tasks.split(",")]:
            for kind in ("step", "update-streamed", "update-whole"):
                out.append({"name": f"sweep-{kind}-T{tasks}", "kind": kind, "tasks": tasks})
    if args.only in (None, "runs") or (args.only or "").startswith("run-"):
        out += [{"name": name, "kind": "run"} for name in RUNS]
    if args.only and args.only not in ("sweep", "runs"):
        out = [c for c in out if c["name"] == args.only]
    return out


def run_all(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = set()
    if os.path.exists(path):
        done = {json.loads(line)["name"] for line in open(path) if line.strip()}
    todo = [c for c in cases(args) if c["name"] not in done]
    print(f"[scale] {len(todo)} case(s) to run, {len(done)} done in {path}", flush=True)
    for i, case in enumerate(todo):
        cmd = [sys.executable, "-m", __spec__.name, "--worker", json.dumps(case), "--device", args.device,
               "--scratch", args.scratch, "--sweep-preset", args.sweep_preset]
        print(f"[scale] ({i + 1}/{len(todo)}) {case['name']} ...", flush=True)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if res.returncode != 0:
            rec = {"error": res.stderr[-3000:]}
            print(f"    FAILED:\n{res.stderr[-3000:]}", flush=True)
        else:
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"    skipped: {rec['skipped']}" if "skipped" in rec else
                  f"    {rec['time_s']:.1f} s, peak extra {rec['peak_extra_bytes'] / 2**30:.2f} GiB", flush=True)
        rec.update(name=case["name"], kind=case["kind"], started=started, device=args.device,
                   sweep_preset=args.sweep_preset, **({"tasks": case["tasks"]} if "tasks" in case else {}))
        rec["machine"] = machine()
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    render(args.out)


def render(out: str) -> None:
    """OUT/results.md (tables) and OUT/scale.png (time and peak memory against T) from OUT/results.jsonl."""
    recs = [json.loads(line) for line in open(os.path.join(out, "results.jsonl")) if line.strip()]
    ok = [r for r in recs if "error" not in r and "skipped" not in r]
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["# Scale benchmark", "", f"Written by benchmarks/scale.py from results.jsonl "
             f"({len(recs)} cases, {len(recs) - len(ok)} failed).", ""]
    sweep = [r for r in ok if r["kind"] != "run"]
    if sweep:
        m = sweep[0]["machine"]
        lines += [f"Machine: {m.get('cpu', m.get('gpu', '?'))}, torch {m.get('torch')}, commit "
                  f"{m.get('git_commit', '?')[:10]}; device {sweep[0]['device']}.", "",
                  "## Sweep: time and peak extra memory against the task count", "",
                  f"Model: {sweep[0]['sweep_preset']} ({sweep[0]['masked_weights']:,} masked weights), one sequence "
                  f"per task; {sweep[0]['machine'].get('torch_threads')} thread(s). Times: wall s (process CPU s); "
                  f"the machine was shared with other work, so the CPU time is the steadier figure.", "",
                  "| T | step s | step GiB | whole update s | whole GiB | [T, P] buffer GiB | streamed s | streamed GiB "
                  "| G (tasks/pass) | same masks |", "|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["kind"], r["tasks"]): r for r in sweep}
        for T in sorted({r["tasks"] for r in sweep}):
            s, w, st = by.get(("step", T)), by.get(("update-whole", T)), by.get(("update-streamed", T))
            cell = lambda r, f: f(r) if r else "-"  # noqa: E731
            secs = lambda r: f"{r['time_s']:.2f} ({r['cpu_s']:.2f})"  # noqa: E731
            lines.append(" | ".join([
                f"| {T}", cell(s, secs), cell(s, lambda r: gib(r["peak_extra_bytes"])),
                cell(w, secs), cell(w, lambda r: gib(r["peak_extra_bytes"])),
                cell(w or st, lambda r: gib(r["whole_buffer_bytes"])),
                cell(st, secs), cell(st, lambda r: gib(r["peak_extra_bytes"])),
                cell(st, lambda r: str(r["tasks_per_pass"])),
                ("yes" if w["masks_sha256"] == st["masks_sha256"] else "NO") if w and st else "-"]) + " |")
    runs = [r for r in ok if r["kind"] == "run"]
    if runs:
        commits = sorted({r["machine"].get("git_commit", "?")[:10] for r in runs})
        lines += ["", "## End-to-end runs (hf.train, synthetic tasks named scale-task-NNN)", "",
                  f"{RUN_SETTINGS['steps']} steps, a mask update at step 2 where mask_interval allows, dropout 0.1, "
                  f"bf16 autocast, {runs[0]['machine'].get('torch_threads')} thread(s), commit {', '.join(commits)}. "
                  "Peak extra: of the whole hf.train call (data, model, steps, update, checkpoint).", "",
                  "| run | tasks | masked weights | [T, P] buffer GiB | updates | G | wall s (CPU s) | peak extra GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            ups = r["mask_updates"]
            lines.append(f"| {r['name']} | {r['tasks']} | {r['masked_weights']:,} | {gib(r['whole_buffer_bytes'])} | "
                         f"{len(ups)} | {ups[0]['tasks_per_pass'] if ups else '-'} | {r['time_s']:.0f} ({r['cpu_s']:.0f}) | "
                         f"{gib(r['peak_extra_bytes'])} |")
        named = {r["name"]: r for r in runs}
        base = named.get("run-paper-T100-no-update")
        if base:
            for other in ("run-paper-T100-streamed", "run-paper-T100-whole"):
                if other in named:
                    d = named[other]["peak_extra_bytes"] - base["peak_extra_bytes"]
                    lines.append(f"\n{other}: peak {d / 2**20:+.0f} MiB against the same run without mask updates.")
    for r in recs:
        if "skipped" in r:
            lines += ["", f"skipped {r['name']}: {r['skipped']}"]
        if "error" in r:
            lines += ["", f"FAILED {r['name']}:", "```", r["error"][-1500:], "```"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if sweep:
        _plot(sweep, os.path.join(out, "scale.png"))


def _plot(sweep, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("step", "o-"), ("update-whole", "s--"), ("update-streamed", "^-")):
        pts = sorted((r["tasks"], r) for r in sweep if r["kind"] == kind)
        if pts:
            ax_t.plot([t for t, _ in pts], [r["time_s"] for _, r in pts], style, label=kind)
            ax_m.plot([t for t, _ in pts], [r["peak_extra_bytes"] / 2**30 for _, r in pts], style, label=kind)
    ax_t.set(xlabel="tasks T", ylabel="wall time (s)", xscale="log", yscale="log", title="time")
    ax_m.set(xlabel="tasks T", ylabel="peak extra memory (GiB)", xscale="log", title="peak memory")
    ax_m.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tasks", default="5,50,160,320", help="task counts of the sweep")
    ap.add_argument("--sweep-preset", default="reduced", help="'reduced' (hidden 256, 3 layers) or a preset name")
    ap.add_argument("--only", help="sweep, runs or one case name")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scale_cpu"))
    ap.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "harmodt_scale"))
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per case")
    ap.add_argument("--render", action="store_true", help="only render OUT/results.md and the plot")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.render:
        render(args.out)
        return 0
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
