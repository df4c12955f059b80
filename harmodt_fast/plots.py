"""Figures for an evaluation report and a training run (matplotlib, Agg backend; imported only when plotting).

- success_bars: per-task success rate of one report, with the mean over tasks;
- success_curve: mean success against training step, from the evaluation lines of a run's metrics.jsonl;
- loss_curve: training loss against step, from the training lines of the same log;
- mask_overlap_heatmap: the T x T Jaccard overlap of the tasks' masks (TaskMasks.overlap());
- agreement_heatmap: the T x T task gradient agreement (cosine) the trainer stores in the checkpoint as
  "task_agreement" at its last mask update.
plot_all() draws every figure the inputs allow and says which it skipped and why.
For a suite report (hf.reproduce):
- suite_success_curves: mean success against step per arm, band min-max over seeds;
- suite_per_task: per-task final success per arm, mean over seeds;
- performance_profile: share of task x seed runs with success >= tau per arm, band: the 95% bootstrap interval;
- iqm_bars: each arm's IQM with its 95% interval, success and held-out action MSE.
"""
from __future__ import annotations

import json
import os

from harmodt_fast.tasks import short_name


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'harmodt_fast[plot]'") from exc
    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend picked up from the environment
    import matplotlib.pyplot as plt

    return plt


def success_bars(report: dict, path: str) -> str:
    plt = _pyplot()
    tasks = list(report["per_task"])
    rates = [report["per_task"][t]["success_rate"] for t in tasks]
    colors = ["tab:blue" if report["per_task"][t].get("seen", True) else "tab:orange" for t in tasks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(tasks) + 2.0), 4.0))
    ax.bar(range(len(tasks)), rates, color=colors)
    ax.axhline(report["mean_success"], color="black", lw=1, ls="--", label=f"mean {report['mean_success']:.2f}")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([short_name(t) for t in tasks], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    title = f"{report.get('episodes', '?')} episodes per task"
    if report.get("step") is not None:
        title += f", step {report['step']}"
    if any(c == "tab:orange" for c in colors):
        title += " (orange: unseen tasks, consensus mask)"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def read_log(metrics_path: str) -> list[dict]:
    """The JSON objects of a metrics.jsonl, in file order; a damaged line is a ValueError naming it."""
    entries = []
    with open(metrics_path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{metrics_path}:{n}: not a JSON line ({exc})") from exc
            if isinstance(entry, dict) and "step" in entry:
                entries.append(entry)
    return entries


def read_eval_log(metrics_path: str) -> list[tuple[int, float]]:
    """(step, mean success) of every evaluation line of a metrics.jsonl, in file order."""
    return [(int(e["step"]), float(e["eval"]["mean_success"])) for e in read_log(metrics_path)
            if isinstance(e.get("eval"), dict)]


def loss_curve(metrics_path: str, path: str) -> str | None:
    """Training loss (mean over tasks) against step, from the training lines of a metrics.jsonl; None if none."""
    points = sorted((int(e["step"]), float(e["loss"])) for e in read_log(metrics_path) if "loss" in e)
    if not points:
        return None
    plt = _pyplot()
    steps, losses = zip(*points)
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(steps, losses)
    ax.set_xlabel("training step")
    ax.set_ylabel("action MSE (mean over tasks)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "run", fontsize=9)
    return _save(fig, path)


def success_curve(metrics_path: str, path: str) -> str | None:
    """None when the log has no evaluation lines."""
    points = read_eval_log(metrics_path)
    if not points:
        return None
    plt = _pyplot()
    steps, rates = zip(*sorted(points))
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(steps, rates, marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean success rate")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "run", fontsize=9)
    return _save(fig, path)


def heatmap(matrix, labels, path: str, title: str, vmin: float, vmax: float, cmap: str, label: str) -> str:
    plt = _pyplot()
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"heatmap {title!r}: matrix of shape {m.shape} does not fit {len(labels)} labels")
    size = max(4.0, 0.18 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    ticks = range(len(labels))
    fontsize = 7 if len(labels) <= 30 else 5
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([short_name(t) for t in labels], rotation=90, fontsize=fontsize)
    ax.set_yticklabels([short_name(t) for t in labels], fontsize=fontsize)
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def mask_overlap_heatmap(masks, tasks, path: str) -> str:
    """masks: the model's hf.TaskMasks."""
    return heatmap(masks.overlap().numpy(), tasks, path, "task mask overlap (Jaccard)", 0.0, 1.0, "viridis",
                   "|M_i ∧ M_j| / |M_i ∨ M_j|")


def agreement_heatmap(agreement, tasks, path: str) -> str:
    return heatmap(agreement, tasks, path, "task gradient agreement (cosine, last mask update)", -1.0, 1.0,
                   "RdBu", "cos(g_i, g_j)")


def plot_all(report: dict, checkpoint, out_dir: str, metrics_path: str | None = None) -> dict:
    """Draws every figure the inputs allow into out_dir. checkpoint: a path, a run folder, a loaded checkpoint
    dict or a RunState (for the masks and the stored task agreement). Returns {figure name: path, or the reason
    it was skipped}."""
    from harmodt_fast.checkpoint import RunState, model_from_checkpoint, read_run
    from harmodt_fast.loggers import METRICS_NAME

    os.makedirs(out_dir, exist_ok=True)
    out = {"success_bars": success_bars(report, os.path.join(out_dir, "success_per_task.png"))}
    loaded = isinstance(checkpoint, (dict, RunState))
    state = read_run(checkpoint if loaded else os.fspath(checkpoint))[0]  # or an export
    if metrics_path is None and not loaded:
        path = os.fspath(checkpoint)
        metrics_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)),
                                    METRICS_NAME)
    if metrics_path and os.path.isfile(metrics_path):
        curve = success_curve(metrics_path, os.path.join(out_dir, "success_vs_step.png"))
        out["success_curve"] = curve or f"skipped: no evaluation lines in {metrics_path}"
    else:
        out["success_curve"] = "skipped: no metrics.jsonl next to the checkpoint"
    tasks = list(state.tasks)
    model, _ = model_from_checkpoint(state)
    masks = model.task_masks()
    out["mask_overlap"] = (mask_overlap_heatmap(masks, tasks, os.path.join(out_dir, "mask_overlap.png"))
                           if masks is not None else "skipped: the model has no task masks")
    agreement = state.task_agreement
    out["task_agreement"] = (agreement_heatmap(agreement, tasks, os.path.join(out_dir, "task_agreement.png"))
                             if agreement is not None else "skipped: the checkpoint has no task_agreement "
                             "(written by the trainer at a mask update)")
    return out


# ---- suite reports (report.json of hf.reproduce) ----------------------------------------------------------------
def _runs(report: dict, quality: str, arm: str) -> list[dict]:
    return [r for r in report["runs"] if r["quality"] == quality and r["arm"] == arm]


def suite_success_curves(report: dict, path: str) -> str:
    plt = _pyplot()
    import numpy as np

    qualities = list(report["summary"])
    fig, axes = plt.subplots(1, len(qualities), figsize=(5.5 * len(qualities), 4.0), squeeze=False)
    for ax, quality in zip(axes[0], qualities):
        for arm in report["summary"][quality]:
            curves = [dict(map(tuple, r["curve"])) for r in _runs(report, quality, arm)]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            vals = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, vals.mean(0), marker="o", label=arm)
            ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.2)
        ax.set_title(f"{report['suite']} {quality}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("mean success (band: min-max over seeds)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def suite_per_task(report: dict, path: str) -> str:
    plt = _pyplot()
    import numpy as np

    qualities, tasks = list(report["summary"]), report["budget"]["tasks"]
    arms = list(report["summary"][qualities[0]])
    fig, axes = plt.subplots(len(qualities), 1, figsize=(max(6.0, 0.25 * len(tasks) * len(arms) + 3),
                                                         3.5 * len(qualities)), squeeze=False)
    width = 0.8 / len(arms)
    for ax, quality in zip(axes[:, 0], qualities):
        for j, arm in enumerate(arms):
            vals = [np.mean([r["per_task"][t]["final"] for r in _runs(report, quality, arm)]) for t in tasks]
            ax.bar(np.arange(len(tasks)) + (j - (len(arms) - 1) / 2) * width, vals, width, label=arm)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([short_name(t) for t in tasks], rotation=90 if len(tasks) > 10 else 0, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("final success")
        ax.set_title(f"{quality}: per task, mean over seeds", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def performance_profile(report: dict, path: str) -> str:
    """From report["statistics"][quality]["profile"][arm] ({"taus", "fraction", "low", "high"})."""
    plt = _pyplot()
    stats = report["statistics"]
    fig, axes = plt.subplots(1, len(stats), figsize=(5.5 * len(stats), 4.0), squeeze=False)
    for ax, (quality, s) in zip(axes[0], stats.items()):
        for arm, prof in s["profile"].items():
            ax.step(prof["taus"], prof["fraction"], where="post", label=arm)
            ax.fill_between(prof["taus"], prof["low"], prof["high"], step="post", alpha=0.2)
        ax.set_xlabel("success threshold tau")
        ax.set_ylabel("share of task x seed runs with success >= tau")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(f"{report['suite']} {quality} (band: 95% stratified bootstrap)", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, path)


def iqm_bars(report: dict, path: str) -> str:
    """Each arm's IQM with its 95% interval: final success per quality and, where computed, held-out action MSE."""
    plt = _pyplot()
    stats = report["statistics"]
    metrics = [m for m in ("success", "action_mse") if any(m in a for s in stats.values() for a in s["arms"].values())]
    fig, axes = plt.subplots(len(metrics), len(stats), figsize=(5.0 * len(stats), 3.5 * len(metrics)), squeeze=False)
    for col, (quality, s) in enumerate(stats.items()):
        for row, metric in enumerate(metrics):
            ax, arms = axes[row, col], [a for a in s["arms"] if metric in s["arms"][a]]
            est = [s["arms"][a][metric]["iqm"] for a in arms]
            err = [[e["point"] - e["low"] for e in est], [e["high"] - e["point"] for e in est]]
            ax.barh(range(len(arms)), [e["point"] for e in est], xerr=err, capsize=4, color="tab:blue", alpha=0.7)
            ax.set_yticks(range(len(arms)))
            ax.set_yticklabels(arms, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("IQM of final success" if metric == "success" else "IQM of held-out action MSE (lower is "
                          "better)")
            if metric == "success":
                ax.set_xlim(0, 1.05)
            ax.grid(alpha=0.3, axis="x")
            ax.set_title(f"{quality} (bars: 95% stratified bootstrap)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
