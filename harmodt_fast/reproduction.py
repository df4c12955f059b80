"""`hf.reproduce` / `harmodt-fast reproduce`: the mechanism-ablation suite, every arm on the same data and budget.

An arm is a method plus config settings: `harmodt` (harmony mask updates), `random-masks` (the same per-task ERK
masks, never updated), `prompt-dt`, `mtdt`, and `harmodt-flip` (harmodt with `flip_fraction` of each task's
active weights flipped per update, so that the updates matter within a short budget; its folder and report name
carry the fraction, e.g. `harmodt-flip0.05`). For every quality (near-optimal, sub-optimal) the suite collects
one dataset (sub-optimal is the first half of the near-optimal buffer, as in the paper: `episodes_per_task // 2`
episodes of the same ramp), trains every (arm, seed) on it with one budget, evaluates every `eval_every` steps and
at the end by the paper's protocol, scores the final model's action MSE on held-out expert episodes (another data
seed), and writes `report.json`, `report.md` and plots (suite_report.py, suite_markdown.py). Every number of the
report is read back from the runs' files. Finished runs are kept: running the same command again continues a
killed suite.
"""
from __future__ import annotations

import json
import os
import re
import time

QUALITIES = ("near-optimal", "sub-optimal")
FLIP_ARM = "harmodt-flip"
ARMS = ("harmodt", "random-masks", "prompt-dt", "mtdt", FLIP_ARM)
EXPERT_SEED_OFFSET = 1  # the held-out expert episodes use data seed data_seed + 1: none of them is trained on


def arm_settings(arm: str, flip_fraction: float) -> tuple[str, dict]:
    """(the arm's name in folders and reports, its HarmoDTConfig settings) for an entry of ARMS."""
    if arm == FLIP_ARM:
        return f"{FLIP_ARM}{flip_fraction:g}", {"method": "harmodt", "flip_fraction": float(flip_fraction)}
    if arm not in ARMS:
        raise ValueError(f"reproduce: unknown arm {arm!r}; expected one of {ARMS}")
    return arm, {"method": arm}


def reproduce(suite="MT5", out: str = "reports/mt5", *, qualities=QUALITIES, arms=ARMS, seeds=(0, 1, 2),
              steps: int = 1000, preset: str = "demo", episodes_per_task: int = 100, eval_episodes: int = 10,
              eval_every: int = 250, eval_max_steps: int = 500, episode_steps: int = 500, flip_fraction: float = 0.05,
              expert_episodes: int = 5, data_root: str | None = None, data_seed: int = 0, device: str = "auto",
              workers: int | None = None, progress: bool = True, bootstrap_reps: int = 10000, **overrides) -> dict:
    """Runs (or continues) the suite and returns the report dict (also written to out/report.json).

    suite: a task set name ("MT5", "MT10", "MT30", "MT50") or a list of task names; arms: entries of ARMS;
    steps: training steps of every run; episodes_per_task: the near-optimal buffer per task (sub-optimal gets its
    first half); eval_every: steps between evaluations (the last step is always evaluated); flip_fraction: the
    harmodt-flip arm's flips per mask update, a share of each task's active weights; expert_episodes: held-out
    expert episodes per task for the action MSE (0: none); bootstrap_reps: bootstrap samples per interval;
    overrides: further HarmoDTConfig fields, the same for every run. Runs land in
    out/runs/<quality>/<arm>/seed<k>; data in data_root (default out/data).
    """
    from harmodt_fast.action_mse import cached_action_mse
    from harmodt_fast.config import HarmoDTConfig
    from harmodt_fast.data import collect
    from harmodt_fast.runtime import integer_in
    from harmodt_fast.suite_report import build_report, suite_run_dir, write_json
    from harmodt_fast.tasks import resolve_tasks
    from harmodt_fast.trainer import train

    if "methods" in overrides:
        raise ValueError("reproduce: methods= is now arms= (a method plus settings; the methods are arms too)")
    tasks = resolve_tasks(suite)
    suite_name = suite if isinstance(suite, str) and "," not in suite else f"{len(tasks)} tasks"
    bad = [q for q in qualities if q not in QUALITIES]
    if bad:
        raise ValueError(f"reproduce: unknown qualities {bad}; expected {QUALITIES}")
    if not 0.0 < flip_fraction < 1.0 and FLIP_ARM in arms:
        raise ValueError(f"reproduce: flip_fraction must be in (0, 1) for the {FLIP_ARM} arm, got {flip_fraction}")
    named = [arm_settings(a, flip_fraction) for a in arms]
    if not named or len({n for n, _ in named}) != len(named):
        raise ValueError(f"reproduce: needs at least one arm and no arm twice, got {list(arms)}")
    taken = sorted({"method", "flip_fraction"} & set(overrides))
    if taken:
        raise ValueError(f"reproduce: {taken} are set by the arms; pass arms (and flip_fraction), not overrides")
    if not seeds or steps <= 0 or episodes_per_task < 4 or eval_every <= 0:
        raise ValueError(f"reproduce: needs seeds, steps > 0, eval_every > 0 and episodes_per_task >= 4 (the "
                         f"sub-optimal half needs 2 per task: the sampler keeps one for prompts), got "
                         f"seeds={list(seeds)}, steps={steps}, episodes_per_task={episodes_per_task}, "
                         f"eval_every={eval_every}")
    for name, value in (("steps", steps), ("eval_every", eval_every), ("episodes_per_task", episodes_per_task),
                        ("expert_episodes", expert_episodes), ("bootstrap_reps", bootstrap_reps),
                        *((f"seeds[{i}]", s) for i, s in enumerate(seeds))):
        integer_in(name, value, 0)  # 2.7 steps is not 2 (the ranges are checked above)
    for name, settings in named:  # unknown preset, field or method: an error naming the arm before any work
        try:
            HarmoDTConfig.from_preset(preset, **overrides, **settings)
        except ValueError as exc:
            raise ValueError(f"reproduce: arm {name}: {exc}") from exc
    out = os.path.abspath(out)
    data_root = os.path.abspath(data_root or os.path.join(out, "data"))
    budget = {"suite": suite_name, "tasks": tasks, "preset": preset, "steps": steps,
              "episodes_per_task": {q: _episodes(q, episodes_per_task) for q in QUALITIES},
              "episode_steps": episode_steps, "data_seed": data_seed, "eval_episodes": eval_episodes,
              "eval_every": eval_every, "eval_max_steps": eval_max_steps, "overrides": overrides,
              "config": _shared_config(preset, overrides)}
    os.makedirs(out, exist_ok=True)
    _check_same_budget(out, budget)

    def data_folder(quality, n, seed):
        return os.path.join(data_root, f"{_slug(suite_name)}-{quality}-{n}ep-{episode_steps}steps-seed{seed}")

    datasets = {}
    for quality in qualities:
        n = _episodes(quality, episodes_per_task)
        path = data_folder(quality, n, data_seed)
        print(f"[data] {quality}: {len(tasks)} tasks x {n} episodes -> {path}", flush=True)
        datasets[quality] = collect(tasks, path, episodes_per_task=n, quality=quality, seed=data_seed,
                                    workers=workers, episode_steps=episode_steps, progress=progress)
    expert = None
    if expert_episodes:
        seed = data_seed + EXPERT_SEED_OFFSET
        path = data_folder("expert", expert_episodes, seed)
        print(f"[data] held-out expert: {len(tasks)} tasks x {expert_episodes} episodes -> {path}", flush=True)
        expert = {"path": collect(tasks, path, episodes_per_task=expert_episodes, quality="expert", seed=seed,
                                  workers=workers, episode_steps=episode_steps, progress=progress),
                  "episodes_per_task": expert_episodes, "seed": seed}

    plan = [(q, name, settings["method"], s) for q in qualities for name, settings in named for s in seeds]
    settings_of = dict(named)
    for i, (quality, arm, _, seed) in enumerate(plan, 1):
        run_dir = suite_run_dir(out, quality, arm, seed)
        state = "done, kept" if _finished(run_dir, steps) else "training"
        print(f"[run {i}/{len(plan)}] {quality} {arm} seed {seed}: {state} ({run_dir})", flush=True)
        if state == "done, kept":
            continue
        t0 = time.perf_counter()
        train(datasets[quality], run_dir, preset=preset, steps=steps, device=device, progress=progress, seed=seed,
              eval_every=eval_every, eval_episodes=eval_episodes, eval_max_steps=eval_max_steps,
              eval_workers=workers, **settings_of[arm], **overrides)
        write_json(os.path.join(run_dir, "wall_time.json"), {"wall_s": time.perf_counter() - t0})
        if expert is not None:  # right after training, while the run is fresh; kept runs get theirs in the report
            cached_action_mse(run_dir, expert["path"], device)
    report = build_report(out, budget, plan, expert_data=expert, device=device, reps=bootstrap_reps)
    write_report(report, out)
    return report


def write_report(report: dict, out: str) -> dict:
    """report.json, report.md and the plots under out/plots; returns {figure: path or reason skipped}."""
    from harmodt_fast._io import atomic_write
    from harmodt_fast.suite_markdown import render_markdown
    from harmodt_fast.suite_report import draw_figures, write_json

    write_json(os.path.join(out, "report.json"), report)
    figures = draw_figures(report, out)
    atomic_write(os.path.join(out, "report.md"), lambda f: f.write(render_markdown(report, figures)), binary=False)
    return figures


def rebuild_report(out: str, *, bootstrap_reps: int = 10000, device: str = "cpu") -> dict:
    """Builds and writes the report of the suite folder `out` again from its files alone (budget.json, the runs
    and expert data its report.json names, each run's evaluation files and action_mse.json), e.g. after the
    report's code changed; returns it. A report.json of format /1 (methods, no arms) reads as arms = methods."""
    from harmodt_fast.suite_report import build_report

    with open(os.path.join(out, "budget.json")) as f:
        budget = json.load(f)
    with open(os.path.join(out, "report.json")) as f:
        old = json.load(f)
    plan = [(r["quality"], r.get("arm", r["method"]), r["method"], r["seed"]) for r in old["runs"]]
    expert = old.get("expert_data")
    if expert is not None:
        expert = {**expert, "path": os.path.join(out, expert["path"])}
    report = build_report(out, budget, plan, expert_data=expert, device=device, reps=bootstrap_reps)
    write_report(report, out)
    return report


def _episodes(quality: str, near_optimal: int) -> int:
    # the paper's sub-optimal data is the first half of each near-optimal buffer; hf.collect's sub-optimal ramp of
    # E episodes is exactly the first E episodes of the near-optimal ramp of 2E
    return near_optimal // 2 if quality == "sub-optimal" else near_optimal


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _finished(run_dir: str, steps: int) -> bool:
    return os.path.isfile(os.path.join(run_dir, f"evaluation_step{steps}.json"))


def _shared_config(preset: str, overrides: dict) -> dict:
    """The resolved config fields every run shares: a default changed by a later version of the code changes the
    budget, so that runs trained before and after it never share a report (not the arm's, seed's and step
    fields, nor those that do not change the training trajectory)."""
    from harmodt_fast.checkpoint import NON_TRAJECTORY_FIELDS
    from harmodt_fast.config import HarmoDTConfig

    resolved = HarmoDTConfig.from_preset(preset, **overrides).to_dict()
    per_run = {"method", "flip_fraction", "seed", "steps", "tasks", "num_tasks"}
    return {k: v for k, v in resolved.items() if k not in per_run | NON_TRAJECTORY_FIELDS}


def _check_same_budget(out: str, budget: dict) -> None:
    """A suite folder holds one budget: continuing it with other settings would mix runs in one report. (Which
    qualities, arms and seeds run is not part of it: shards of one suite may run side by side in one folder, and
    an arm's settings are in its folder's name.)"""
    from harmodt_fast.suite_report import write_json

    path = os.path.join(out, "budget.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(budget))  # as it would read back (tuples become lists)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if "config" in diff and isinstance(old.get("config"), dict):  # name the fields
                diff.remove("config")
                diff += sorted(f"config.{k}" for k in set(old["config"]) | set(new["config"])
                               if old["config"].get(k, "absent") != new["config"].get(k, "absent"))
            raise ValueError(f"{out} holds a suite with another budget (differs in {', '.join(diff)}); use another "
                             f"folder")
    else:
        write_json(path, budget)
