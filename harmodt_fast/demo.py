"""`harmodt-fast demo`: the whole job on a laptop-sized problem, from nothing to a success table.

1. collects a small MT5 dataset from Meta-World's scripted experts (replay-like, near-optimal) unless present;
2. trains the `demo` preset of HarmoDT on it (mixed-task steps + harmony mask updates) for a few minutes on CPU;
3. evaluates every task by the paper's protocol and prints the per-task success table;
4. writes the report (JSON) and plots (loss, success bars, mask overlap, task agreement) next to the run.
Everything lands under `root` (default ./harmodt_demo); running it again reuses the data and the finished run.
"""
from __future__ import annotations

import os


def run_demo(root: str = "harmodt_demo", episodes_per_task: int = 40, steps: int | None = None,
             eval_episodes: int = 10, seed: int = 0, workers: int | None = None, device: str = "auto",
             tasks="MT5", episode_steps: int = 500) -> dict:
    """Returns the evaluation report. episode_steps shortens collected and evaluated episodes (for tests)."""
    from harmodt_fast.data import collect
    from harmodt_fast.evaluation import evaluate, format_table, save_report
    from harmodt_fast.trainer import train
    from harmodt_fast.tasks import resolve_tasks

    task_names = resolve_tasks(tasks)
    root = os.path.abspath(root)
    data = os.path.join(root, f"data-{len(task_names)}tasks-near-optimal-{episodes_per_task}ep-{episode_steps}steps-seed{seed}")
    out = os.path.join(root, "run")
    print(f"[1/3] dataset: {data}")
    collect(task_names, data, episodes_per_task=episodes_per_task, quality="near-optimal", seed=seed,
               workers=workers, episode_steps=episode_steps)
    print(f"[2/3] training the demo preset into {out}")
    result = train(data, out, preset="demo", steps=steps, device=device, seed=seed)
    print(f"[3/3] evaluating {len(task_names)} tasks x {eval_episodes} episodes")
    report = evaluate(result, episodes=eval_episodes, seed=seed, device=device, progress=True,
                         max_episode_steps=episode_steps)
    print(format_table(report))
    save_report(report, os.path.join(out, "eval_report.json"))
    figures = _plots(report, result, out)
    for name, path in figures.items():
        print(f"  figure {name}: {path}")
    return report


def _plots(report, result, out) -> dict:
    try:
        from harmodt_fast import plots
    except ImportError as exc:  # pragma: no cover - matplotlib is optional
        print(f"  (no plots: {exc})")
        return {}
    figures = {}
    try:
        figures.update(plots.plot_all(report, result.checkpoint, out, metrics_path=result.metrics) or {})
        loss = plots.loss_curve(result.metrics, os.path.join(out, "loss.png"))
        if loss:
            figures["loss"] = loss
    except ImportError as exc:
        print(f"  (no plots: {exc})")
    return figures

