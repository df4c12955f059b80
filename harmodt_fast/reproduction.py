"""`hf.reproduce` / `harmodt-fast reproduce`: HarmoDT against Prompt-DT and MTDT on the same data and budget.

For every quality (near-optimal, sub-optimal) the suite collects one dataset (sub-optimal is the first half of
the near-optimal buffer, as in the paper: `episodes_per_task // 2` episodes of the same ramp), trains every
(method, seed) on it with one budget, evaluates every `eval_every` steps and at the end by the paper's protocol,
and writes `report.json`, `report.md` and plots. Every number of the report is read back from the runs'
`evaluation_step<N>.json` files. Finished runs are kept: running the same command again continues a killed suite.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import time

import numpy as np

QUALITIES = ("near-optimal", "sub-optimal")
METHODS = ("harmodt", "prompt-dt", "mtdt")
REPORT_FORMAT = "harmodt_fast.reproduce/1"

# Success rates (%) the HarmoDT paper reports (Table 1), shown next to ours in report.md
PAPER = {
    "MT5": {"near-optimal": {"harmodt": "100"}, "sub-optimal": {"harmodt": "68-75"}},
    "MT50": {"near-optimal": {"harmodt": "77.8-78.8", "prompt-dt": "71.6", "mtdt": "65.8"},
             "sub-optimal": {"harmodt": "56.2-57.5", "prompt-dt": "51.4", "mtdt": "42.3"}},
}


def reproduce(suite="MT5", out: str = "reports/mt5", *, qualities=QUALITIES, methods=METHODS, seeds=(0, 1, 2),
              steps: int = 1000, preset: str = "demo", episodes_per_task: int = 100, eval_episodes: int = 10,
              eval_every: int = 250, eval_max_steps: int = 500, episode_steps: int = 500, data_root: str | None = None,
              data_seed: int = 0, device: str = "auto", workers: int | None = None, progress: bool = True,
              **overrides) -> dict:
    """Runs (or continues) the suite and returns the report dict (also written to out/report.json).

    suite: a task set name ("MT5", "MT10", "MT30", "MT50") or a list of task names; steps: training steps of every
    run; episodes_per_task: the near-optimal buffer per task (sub-optimal gets its first half); eval_every: steps
    between evaluations (the last step is always evaluated); overrides: further HarmoDTConfig fields, the same for
    every run. Runs land in out/runs/<quality>/<method>/seed<k>; data in data_root (default out/data).
    """
    from harmodt_fast.config import HarmoDTConfig
    from harmodt_fast.data import collect
    from harmodt_fast.runtime import integer_in
    from harmodt_fast.tasks import resolve_tasks
    from harmodt_fast.trainer import train

    tasks = resolve_tasks(suite)
    suite_name = suite if isinstance(suite, str) and "," not in suite else f"{len(tasks)} tasks"
    bad = [q for q in qualities if q not in QUALITIES] + [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"reproduce: unknown qualities/methods {bad}; expected {QUALITIES} and {METHODS}")
    if not seeds or steps <= 0 or episodes_per_task < 4 or eval_every <= 0:
        raise ValueError(f"reproduce: needs seeds, steps > 0, eval_every > 0 and episodes_per_task >= 4 (the "
                         f"sub-optimal half needs 2 per task: the sampler keeps one for prompts), got "
                         f"seeds={list(seeds)}, steps={steps}, episodes_per_task={episodes_per_task}, "
                         f"eval_every={eval_every}")
    for name, value in (("steps", steps), ("eval_every", eval_every), ("episodes_per_task", episodes_per_task),
                        *((f"seeds[{i}]", s) for i, s in enumerate(seeds))):
        integer_in(name, value, 0)  # 2.7 steps is not 2 (the ranges are checked above)
    HarmoDTConfig.from_preset(preset, **overrides)  # unknown preset or field: an error before any work
    out = os.path.abspath(out)
    data_root = os.path.abspath(data_root or os.path.join(out, "data"))
    budget = {"suite": suite_name, "tasks": tasks, "preset": preset, "steps": steps,
              "episodes_per_task": {q: _episodes(q, episodes_per_task) for q in QUALITIES},
              "episode_steps": episode_steps, "data_seed": data_seed, "eval_episodes": eval_episodes,
              "eval_every": eval_every, "eval_max_steps": eval_max_steps, "overrides": overrides}
    os.makedirs(out, exist_ok=True)
    _check_same_budget(out, budget)

    datasets = {}
    for quality in qualities:
        n = _episodes(quality, episodes_per_task)
        path = os.path.join(data_root, f"{_slug(suite_name)}-{quality}-{n}ep-{episode_steps}steps-seed{data_seed}")
        print(f"[data] {quality}: {len(tasks)} tasks x {n} episodes -> {path}", flush=True)
        datasets[quality] = collect(tasks, path, episodes_per_task=n, quality=quality, seed=data_seed,
                                       workers=workers, episode_steps=episode_steps, progress=progress)

    plan = [(q, m, s) for q in qualities for m in methods for s in seeds]
    for i, (quality, method, seed) in enumerate(plan, 1):
        run_dir = _run_dir(out, quality, method, seed)
        state = "done, kept" if _finished(run_dir, steps) else "training"
        print(f"[run {i}/{len(plan)}] {quality} {method} seed {seed}: {state} ({run_dir})", flush=True)
        if state == "done, kept":
            continue
        t0 = time.perf_counter()
        train(datasets[quality], run_dir, preset=preset, steps=steps, device=device, progress=progress,
                 method=method, seed=seed, eval_every=eval_every, eval_episodes=eval_episodes,
                 eval_max_steps=eval_max_steps, eval_workers=workers, **overrides)
        _write_json(os.path.join(run_dir, "wall_time.json"), {"wall_s": time.perf_counter() - t0})
    report = build_report(out, budget, plan)
    write_report(report, out)
    return report


def _episodes(quality: str, near_optimal: int) -> int:
    # the paper's sub-optimal data is the first half of each near-optimal buffer; hf.collect's sub-optimal ramp of
    # E episodes is exactly the first E episodes of the near-optimal ramp of 2E
    return near_optimal // 2 if quality == "sub-optimal" else near_optimal


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _run_dir(out, quality, method, seed) -> str:
    return os.path.join(out, "runs", quality, method, f"seed{seed}")


def _finished(run_dir: str, steps: int) -> bool:
    return os.path.isfile(os.path.join(run_dir, f"evaluation_step{steps}.json"))


def _check_same_budget(out: str, budget: dict) -> None:
    """A suite folder holds one budget: continuing it with other settings would mix runs in one report. (Which
    qualities, methods and seeds run is not part of it: shards of one suite may run side by side in one folder.)"""
    path = os.path.join(out, "budget.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(budget))  # as it would read back (tuples become lists)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{out} holds a suite with another budget (differs in {diff}); use another folder")
    else:
        _write_json(path, budget)


def _write_json(path: str, obj) -> str:
    from harmodt_fast._io import atomic_write

    return atomic_write(path, lambda f: json.dump(obj, f, indent=1), binary=False)


# ---- the report, from the runs' evaluation files --------------------------------------------------------------
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


def build_report(out: str, budget: dict, plan) -> dict:
    runs = []
    for quality, method, seed in plan:
        run_dir = _run_dir(out, quality, method, seed)
        entry = {"quality": quality, "method": method, "seed": seed, **summarise_run(run_dir, budget["steps"]),
                 "run_dir": os.path.relpath(run_dir, out)}
        wall = os.path.join(run_dir, "wall_time.json")
        if os.path.isfile(wall):
            with open(wall) as f:
                entry["wall_s"] = json.load(f)["wall_s"]
        runs.append(entry)
    summary: dict = {}
    for quality in dict.fromkeys(q for q, _, _ in plan):
        summary[quality] = {}
        for method in dict.fromkeys(m for _, m, _ in plan):
            mine = [r for r in runs if r["quality"] == quality and r["method"] == method]
            fm, fs = _mean_std([r["final_success"] for r in mine])
            bm, bs = _mean_std([r["best_success"] for r in mine])
            summary[quality][method] = {"final_mean": fm, "final_std": fs, "best_mean": bm, "best_std": bs,
                                        "seeds": [r["seed"] for r in mine]}
    return {"format": REPORT_FORMAT, "suite": budget["suite"], "budget": budget, "runs": runs, "summary": summary,
            "machine": _machine(), "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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


def write_report(report: dict, out: str) -> dict:
    """report.json, report.md and the plots under out/plots; returns {figure: path or reason skipped}."""
    _write_json(os.path.join(out, "report.json"), report)
    figures = _plots(report, out)
    from harmodt_fast._io import atomic_write

    atomic_write(os.path.join(out, "report.md"), lambda f: f.write(render_markdown(report, figures)), binary=False)
    return figures


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def summary_table(report: dict) -> str:
    """Mean success per quality and method, final and best, next to the paper's number (markdown)."""
    lines = ["| quality | method | seeds | final | best | paper |", "| --- | --- | --- | --- | --- | --- |"]
    paper = PAPER.get(report["suite"], {})
    for quality, per_method in report["summary"].items():
        for method, s in per_method.items():
            lines.append(f"| {quality} | {method} | {len(s['seeds'])} | {_pct(s['final_mean'], s['final_std'])} | "
                         f"{_pct(s['best_mean'], s['best_std'])} | {paper.get(quality, {}).get(method, '-')} |")
    return "\n".join(lines)


def render_markdown(report: dict, figures: dict | None = None) -> str:
    b, summary = report["budget"], report["summary"]
    methods = list(next(iter(summary.values())))
    lines = [f"# Reproduction: {report['suite']}", "",
             f"Written {report['written']} by `harmodt-fast reproduce` from the runs' evaluation files "
             f"(`runs/<quality>/<method>/seed<k>/evaluation_step<N>.json`).", "",
             "## Budget", "",
             f"- tasks ({len(b['tasks'])}): {', '.join(t.removesuffix('-v3') for t in b['tasks'])}",
             f"- data: `hf.collect` replay-like ramps from Meta-World's scripted experts, data seed {b['data_seed']}, "
             f"{b['episode_steps']} steps per episode; episodes per task: "
             + ", ".join(f"{q} {n}" for q, n in b["episodes_per_task"].items()),
             f"- model and training: preset `{b['preset']}`, {b['steps']} steps per run, overrides "
             f"{b['overrides'] or 'none'}",
             f"- evaluation: {b['eval_episodes']} episodes per task (goal variants 0..{b['eval_episodes'] - 1}), "
             f"{b['eval_max_steps']} steps, every {b['eval_every']} steps and at the end",
             f"- machine: {report['machine']['cpu']} ({report['machine']['cpus']} CPUs), GPU "
             f"{report['machine']['gpu'] or 'none'}, torch {report['machine']['torch']}"]
    walls = [r["wall_s"] for r in report["runs"] if "wall_s" in r]
    if walls:
        lines.append(f"- wall time: {sum(walls) / 60:.1f} min of training and evaluation over {len(walls)} runs "
                     f"(mean {np.mean(walls):.0f} s per run)")
    lines += ["", "## Mean success over tasks (%), mean ± std over seeds", "",
              "final = the evaluation after the last step; best = the running best of the periodic evaluations "
              "(what the published code reports). std: sample standard deviation over seeds.", "",
              summary_table(report)]
    for quality in summary:
        lines += ["", f"## Per task, {quality}: final success (%), mean over seeds", "",
                  "| task | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
        for task in b["tasks"]:
            cells = []
            for method in methods:
                vals = [r["per_task"][task]["final"] for r in report["runs"]
                        if r["quality"] == quality and r["method"] == method]
                cells.append(f"{100 * np.mean(vals):.0f}")
            lines.append(f"| {task.removesuffix('-v3')} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "",
              "Per run: success (%), the last training loss (action MSE), and for HarmoDT what its mask updates saw: "
              "the flips made, the mean share of entries whose task gradient conflicts with the mean gradient "
              "(a_t < 0), and the masks' mean pairwise overlap (Jaccard) at the last update.", "",
              "| quality | method | seed | final | best | best step | curve (step: success) | loss | flips | "
              "conflict | overlap |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        curve = ", ".join(f"{s}: {100 * v:.0f}" for s, v in r["curve"])
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
        masks = (f"{r['flips']} | {r['mean_conflict_fraction']:.3f} | {r['final_mean_overlap']:.3f}"
                 if "flips" in r else "- | - | -")
        lines.append(f"| {r['quality']} | {r['method']} | {r['seed']} | {100 * r['final_success']:.0f} | "
                     f"{100 * r['best_success']:.0f} | {r['best_step']} | {curve} | {loss} | {masks} |")
    if figures:
        lines += ["", "## Figures", ""]
        for name, path in figures.items():
            lines.append(f"- {name}: `{path}`")
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: str) -> dict:
    try:
        from harmodt_fast import plots
        plt = plots._pyplot()
    except ImportError as exc:
        return {"plots": f"skipped: {exc}"}
    folder = os.path.join(out, "plots")
    os.makedirs(folder, exist_ok=True)
    figures = {}
    qualities = list(report["summary"])
    methods = list(next(iter(report["summary"].values())))
    # success against step, mean over seeds with a min-max band
    fig, axes = plt.subplots(1, len(qualities), figsize=(5.5 * len(qualities), 4.0), squeeze=False)
    for ax, quality in zip(axes[0], qualities):
        for method in methods:
            curves = [dict(map(tuple, r["curve"])) for r in report["runs"]
                      if r["quality"] == quality and r["method"] == method]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            vals = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, vals.mean(0), marker="o", label=method)
            ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.2)
        ax.set_title(f"{report['suite']} {quality}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("mean success (band: min-max over seeds)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figures["success_vs_step"] = plots._save(fig, os.path.join(folder, "success_vs_step.png"))
    # per-task final success, mean over seeds
    tasks = report["budget"]["tasks"]
    fig, axes = plt.subplots(len(qualities), 1, figsize=(max(6.0, 0.5 * len(tasks) * len(methods) / 2 + 3), 3.5 * len(qualities)),
                             squeeze=False)
    width = 0.8 / len(methods)
    for ax, quality in zip(axes[:, 0], qualities):
        for j, method in enumerate(methods):
            vals = [np.mean([r["per_task"][t]["final"] for r in report["runs"]
                             if r["quality"] == quality and r["method"] == method]) for t in tasks]
            ax.bar(np.arange(len(tasks)) + (j - (len(methods) - 1) / 2) * width, vals, width, label=method)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([t.removesuffix("-v3") for t in tasks], rotation=90 if len(tasks) > 10 else 0, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("final success")
        ax.set_title(f"{quality}: per task, mean over seeds", fontsize=9)
        ax.legend(fontsize=7)
    figures["per_task"] = plots._save(fig, os.path.join(folder, "per_task.png"))
    # HarmoDT's masks and task agreement at the end of its first seed's run, per quality
    for quality in qualities:
        first = next((r for r in report["runs"] if r["quality"] == quality and r["method"] == "harmodt"), None)
        if first is None:
            continue
        from harmodt_fast.checkpoint import RunState, model_from_checkpoint

        state = RunState.load(os.path.join(out, first["run_dir"]))
        masks = model_from_checkpoint(state)[0].task_masks()
        figures[f"mask_overlap_{quality}"] = plots.mask_overlap_heatmap(
            masks, state.tasks, os.path.join(folder, f"mask_overlap_{quality}.png"))
        if state.task_agreement is not None:
            figures[f"task_agreement_{quality}"] = plots.agreement_heatmap(
                state.task_agreement, state.tasks, os.path.join(folder, f"task_agreement_{quality}.png"))
    return {k: os.path.relpath(v, out) for k, v in figures.items()}
