"""The report of a suite (`hf.reproduce`), built from the files of its runs alone: report.json, report.md, plots.

Per run: final and best success from its `evaluation_step<N>.json` files, training diagnostics from its
metrics.jsonl, the held-out action MSE from its `action_mse.json`. Per arm and quality: mean ± std over seeds, and
the interquartile mean with a 95% stratified bootstrap interval over tasks x seeds (report_stats); HarmoDT against
every other arm: the IQM difference and the probability of improvement with their intervals. report.md puts the
published numbers and the budget differences next to the table and says, from the intervals, which differences
are significant.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform

import numpy as np

REPORT_FORMAT = "harmodt_fast.reproduce/2"
REFERENCE_ARM = "harmodt"  # the arm every other one is compared with
PROFILE_TAUS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))

# Published success rates (%), as (low, high): HarmoDT paper Table 1 and a later paper's table (a range spans what
# they report; random-masks: HarmoDT with random per-task masks, never updated)
PAPER = {
    "MT5": {"near-optimal": {"harmodt": (100, 100), "prompt-dt": (100, 100), "mtdt": (100, 100)},
            "sub-optimal": {"harmodt": (68, 75), "prompt-dt": (67.0, 67.0), "mtdt": (64.7, 64.7)}},
    "MT30": {"near-optimal": {"harmodt": (80, 81.6)}, "sub-optimal": {"harmodt": (60, 62)}},
    "MT50": {"near-optimal": {"harmodt": (77.8, 78.8), "prompt-dt": (71.6, 71.6), "mtdt": (65.8, 65.8),
                              "random-masks": (74.2, 74.2)},
             "sub-optimal": {"harmodt": (56.2, 57.5), "prompt-dt": (51.4, 51.4), "mtdt": (42.3, 42.3)}},
}
# the paper's budget (docs/method.md): 1M steps of 8 sequences per task, the `paper` preset, SAC replay buffers
PAPER_BUDGET = {"steps": 1_000_000, "batch_per_task": 8, "preset": "paper",
                "episodes_per_task": {"near-optimal": 2000, "sub-optimal": 1000}}


def paper_cell(suite: str, quality: str, arm: str) -> str:
    low_high = PAPER.get(suite, {}).get(quality, {}).get(arm)
    if low_high is None:
        return "-"
    low, high = low_high
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def suite_run_dir(out: str, quality: str, arm: str, seed: int) -> str:
    """Where a suite keeps the run of (quality, arm, seed)."""
    return os.path.join(out, "runs", quality, arm, f"seed{seed}")


# ---- one run, from its files --------------------------------------------------------------------------------------
def read_evaluations(run_dir: str) -> list[dict]:
    """The run's evaluation reports ordered by step (each has "step", "mean_success", "per_task")."""
    reports = []
    for path in glob.glob(os.path.join(run_dir, "evaluation_step*.json")):
        with open(path) as f:
            report = json.load(f)
        report["_file"] = os.path.relpath(path, run_dir)
        reports.append(report)
    return sorted(reports, key=lambda r: r["step"])


def summarise_run(run_dir: str, steps: int) -> dict:
    """final (the evaluation at the last step) and best (the running best of the periodic evaluations, as the
    published code reports; per task: each task's success at that best evaluation), from the evaluation files."""
    from harmodt_fast.loggers import METRICS_NAME

    evals = read_evaluations(run_dir)
    final = [e for e in evals if e["step"] == steps]
    if not final:
        raise ValueError(f"{run_dir}: no evaluation at step {steps} (the run is not finished)")
    final = final[0]
    best = max(evals, key=lambda e: (e["mean_success"], -e["step"]))  # ties: the earliest
    tasks = list(final["per_task"])
    return {
        "final_success": final["mean_success"], "best_success": best["mean_success"], "best_step": best["step"],
        **_training_diagnostics(os.path.join(run_dir, METRICS_NAME)),
        "per_task": {t: {"final": final["per_task"][t]["success_rate"], "best": best["per_task"][t]["success_rate"]}
                     for t in tasks},
        "curve": [[e["step"], e["mean_success"]] for e in evals],
        "evaluation_files": [e["_file"] for e in evals],
    }


def _training_diagnostics(metrics_path: str) -> dict:
    """From the run's log: the last training loss and, for HarmoDT, what its mask updates saw (the share of
    entries whose task gradient conflicts with the mean, the masks' mean pairwise overlap, the flips made)."""
    if not os.path.isfile(metrics_path):
        return {}
    losses, updates = [], []
    with open(metrics_path) as f:
        for line in f:
            entry = json.loads(line)
            if "loss" in entry:
                losses.append(entry["loss"])
            if "mask_update" in entry:
                updates.append(entry["mask_update"])
    out = {"final_loss": losses[-1] if losses else None}
    if updates:
        out.update({"mask_updates": len(updates), "flips": sum(u["flips"] for u in updates),
                    "mean_conflict_fraction": float(np.mean([u["conflict_fraction"] for u in updates])),
                    "final_mean_overlap": updates[-1]["mean_overlap"]})
    return out


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# ---- the suite ------------------------------------------------------------------------------------------------------
def build_report(out: str, budget: dict, plan, *, expert_data: dict | None = None, device: str = "cpu",
                 reps: int = 10000) -> dict:
    """The report of the runs of `plan` ((quality, arm, method, seed) tuples) under `out`. expert_data: {"path",
    "episodes_per_task", "seed"} of the held-out expert episodes (None: no action MSE); each run's MSE is read from
    its action_mse.json, computed there first when missing. reps: bootstrap samples per interval."""
    from harmodt_fast.action_mse import cached_action_mse

    runs = []
    for quality, arm, method, seed in plan:
        run_dir = suite_run_dir(out, quality, arm, seed)
        entry = {"quality": quality, "arm": arm, "method": method, "seed": seed,
                 **summarise_run(run_dir, budget["steps"]), "run_dir": os.path.relpath(run_dir, out)}
        wall = os.path.join(run_dir, "wall_time.json")
        if os.path.isfile(wall):
            with open(wall) as f:
                entry["wall_s"] = json.load(f)["wall_s"]
        if expert_data is not None:
            mse = cached_action_mse(run_dir, expert_data["path"], device, step=budget["steps"])
            entry["action_mse"] = {"mean": mse["mean"], "per_task": mse["per_task"]}
        runs.append(entry)
    summary: dict = {}
    for quality in dict.fromkeys(q for q, *_ in plan):
        summary[quality] = {}
        for arm in dict.fromkeys(a for _, a, *_ in plan):
            mine = [r for r in runs if r["quality"] == quality and r["arm"] == arm]
            fm, fs = _mean_std([r["final_success"] for r in mine])
            bm, bs = _mean_std([r["best_success"] for r in mine])
            summary[quality][arm] = {"method": mine[0]["method"], "final_mean": fm, "final_std": fs, "best_mean": bm,
                                     "best_std": bs, "seeds": [r["seed"] for r in mine]}
    report = {"format": REPORT_FORMAT, "suite": budget["suite"], "budget": budget, "runs": runs, "summary": summary,
              "statistics": statistics(runs, budget["tasks"], reps=reps), "machine": _machine(),
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if expert_data is not None:
        report["expert_data"] = {**expert_data, "path": os.path.relpath(expert_data["path"], out)}
    return report


def arm_scores(runs: list[dict], tasks, metric: str) -> np.ndarray:
    """[seeds, tasks] of one arm's runs: final success, or held-out action MSE ("action_mse")."""
    if metric == "success":
        return np.array([[r["per_task"][t]["final"] for t in tasks] for r in runs])
    return np.array([[r["action_mse"]["per_task"][t] for t in tasks] for r in runs])


def statistics(runs: list[dict], tasks, reps: int = 10000) -> dict:
    """Per quality: every arm's IQM and mean with intervals (success; action MSE where computed), its performance
    profile, and REFERENCE_ARM against every other arm."""
    from harmodt_fast.report_stats import compare, interval_estimate, performance_profile

    out = {}
    for quality in dict.fromkeys(r["quality"] for r in runs):
        by_arm = {a: [r for r in runs if r["quality"] == quality and r["arm"] == a]
                  for a in dict.fromkeys(r["arm"] for r in runs if r["quality"] == quality)}
        metrics = ["success"] + (["action_mse"] if all("action_mse" in r for r in runs) else [])
        arms, profile, comparisons = {}, {}, {}
        for arm, mine in by_arm.items():
            arms[arm] = {m: {agg: interval_estimate(arm_scores(mine, tasks, m), agg, reps=reps)
                             for agg in ("iqm", "mean")} for m in metrics}
            profile[arm] = performance_profile(arm_scores(mine, tasks, "success"), PROFILE_TAUS, reps=reps)
        if REFERENCE_ARM in by_arm:
            ref = by_arm[REFERENCE_ARM]
            for arm, mine in by_arm.items():
                if arm != REFERENCE_ARM:
                    comparisons[arm] = {m: compare(arm_scores(ref, tasks, m), arm_scores(mine, tasks, m),
                                                   higher_is_better=m == "success", reps=reps) for m in metrics}
        out[quality] = {"arms": arms, "profile": profile, "comparisons": comparisons}
    return out


def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def write_json(path: str, obj) -> str:
    from harmodt_fast._io import atomic_write

    return atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


def draw_figures(report: dict, out: str) -> dict:
    """The suite's figures under out/plots: {name: path relative to out, or why all were skipped}."""
    try:
        from harmodt_fast import plots
        plots._pyplot()
    except ImportError as exc:
        return {"plots": f"skipped: {exc}"}
    folder = os.path.join(out, "plots")
    figures = {name: draw(report, os.path.join(folder, f"{name}.png")) for name, draw in (
        ("success_vs_step", plots.suite_success_curves), ("per_task", plots.suite_per_task),
        ("performance_profile", plots.performance_profile), ("iqm", plots.iqm_bars))}
    # HarmoDT's masks and task agreement at the end of its first seed's run, per quality
    for quality in report["summary"]:
        first = next((r for r in report["runs"] if r["quality"] == quality and r["arm"] == REFERENCE_ARM), None)
        if first is None:
            continue
        from harmodt_fast.checkpoint import CHECKPOINT_NAME, RunState, model_from_checkpoint

        if not os.path.isfile(os.path.join(out, first["run_dir"], CHECKPOINT_NAME)):  # a report rebuilt from copies
            figures[f"mask_overlap_{quality}"] = f"skipped: no {CHECKPOINT_NAME} in {first['run_dir']}"
            continue
        state = RunState.load(os.path.join(out, first["run_dir"]))
        masks = model_from_checkpoint(state)[0].task_masks()
        figures[f"mask_overlap_{quality}"] = plots.mask_overlap_heatmap(
            masks, state.tasks, os.path.join(folder, f"mask_overlap_{quality}.png"))
        if state.task_agreement is not None:
            figures[f"task_agreement_{quality}"] = plots.agreement_heatmap(
                state.task_agreement, state.tasks, os.path.join(folder, f"task_agreement_{quality}.png"))
    return {k: v if v.startswith("skipped") else os.path.relpath(v, out) for k, v in figures.items()}
