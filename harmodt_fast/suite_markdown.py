"""report.md of a suite, rendered from report.json alone (suite_report.build_report's dict): the budget beside the
paper's, success with intervals beside the published numbers, held-out action MSE, HarmoDT against every other
arm, and a "what this shows / does not show" paragraph generated from the intervals."""
from __future__ import annotations

import numpy as np

from harmodt_fast.suite_report import PAPER, PAPER_BUDGET, REFERENCE_ARM, paper_cell
from harmodt_fast.tasks import short_name

METRIC_NAMES = {"success": "final success", "action_mse": "held-out action MSE"}


def _ci(est: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * est['point']:.{digits}f} [{scale * est['low']:.{digits}f}, {scale * est['high']:.{digits}f}]"


def _metric_ci(est: dict, metric: str) -> str:
    return _ci(est) if metric == "success" else _ci(est, 1.0, 4)


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def budget_lines(report: dict) -> list[str]:
    """The budget of this suite next to the paper's, as a markdown table."""
    from harmodt_fast.config import HarmoDTConfig

    b = report["budget"]
    ours = HarmoDTConfig.from_preset(b["preset"], **b["overrides"])
    paper = HarmoDTConfig.from_preset(PAPER_BUDGET["preset"])

    def model(cfg, preset):
        return (f"preset `{preset}`: hidden {cfg.hidden}, {cfg.layers} layers, context {cfg.context}, "
                f"{cfg.num_parameters() / 1e6:.2f}M parameters")

    episodes = ", ".join(f"{q} {n}" for q, n in b["episodes_per_task"].items())
    paper_episodes = ", ".join(f"{q} {n}" for q, n in PAPER_BUDGET["episodes_per_task"].items())
    lines = ["| | this suite | the paper |", "| --- | --- | --- |",
             f"| training steps per run | {b['steps']:,} ({_share_of_paper_steps(b['steps'])}) | "
             f"{PAPER_BUDGET['steps']:,} |",
             f"| sequences per task per step | {ours.batch_per_task} | {PAPER_BUDGET['batch_per_task']} |",
             f"| model | {model(ours, b['preset'])} | {model(paper, PAPER_BUDGET['preset'])} |",
             f"| episodes per task | {episodes} | {paper_episodes} |",
             f"| data recipe | `hf.collect`: Meta-World's scripted experts on a ramp from random to expert actions, "
             f"{b['episode_steps']} steps per episode, data seed {b['data_seed']} | per-task SAC replay buffers "
             f"(sub-optimal: the first half) |",
             f"| evaluation | {b['eval_episodes']} episodes per task (goal variants 0..{b['eval_episodes'] - 1}), "
             f"{b['eval_max_steps']} steps | 10 episodes per task (goal variants 0..9), 500 steps |",
             f"| other settings | overrides {b['overrides'] or 'none'} | the published defaults |"]
    m = report["machine"]
    lines.append(f"\nMachine: {m['cpu']} ({m['cpus']} CPUs), GPU {m['gpu'] or 'none'}, torch {m['torch']}.")
    walls = [r["wall_s"] for r in report["runs"] if "wall_s" in r]
    if walls:
        lines[-1] += (f" Wall time: {sum(walls) / 60:.1f} min of training and evaluation over {len(walls)} runs "
                      f"(mean {np.mean(walls):.0f} s per run).")
    return lines


def success_table(report: dict) -> str:
    """Per quality and arm: IQM and mean of final success with 95% intervals, mean ± std over seeds, best, paper."""
    lines = ["| quality | arm | seeds | IQM [95% CI] | mean [95% CI] | final, mean ± std over seeds | best | paper |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for quality, per_arm in report["summary"].items():
        for arm, s in per_arm.items():
            est = report["statistics"][quality]["arms"][arm]["success"]
            lines.append(f"| {quality} | {arm} | {len(s['seeds'])} | {_ci(est['iqm'])} | {_ci(est['mean'])} | "
                         f"{_pct(s['final_mean'], s['final_std'])} | {_pct(s['best_mean'], s['best_std'])} | "
                         f"{paper_cell(report['suite'], quality, arm)} |")
    return "\n".join(lines)


def paper_note(report: dict) -> str:
    suite, arms = report["suite"], list(next(iter(report["summary"].values())))
    if suite not in PAPER:
        return "The papers publish no numbers for this task set: the paper column is empty."
    published = "; ".join(f"{q}: " + ", ".join(f"{a} {paper_cell(suite, q, a)}" for a in per) for q, per in
                          PAPER[suite].items())
    note = (f"paper: the published success (%) on {suite} (HarmoDT paper Table 1 and a later paper's table; a "
            f"range spans the values reported), every method's: {published}. '-': none published for that arm "
            f"and quality")
    unpublished = [a for a in arms if not any(a in per for per in PAPER[suite].values())]
    if unpublished:
        note += f" ({', '.join(unpublished)}: no published number on {suite})"
    note += "."
    if suite == "MT5":
        note += " On MT5 near-optimal every method reaches 100 in the paper: MT5 cannot rank them there."
    return note


def comparison_table(report: dict) -> str:
    lines = [f"| quality | metric | {REFERENCE_ARM} vs | IQM difference [95% CI] | P({REFERENCE_ARM} better) [95% CI] "
             f"| significant |", "| --- | --- | --- | --- | --- | --- |"]
    for quality, s in report["statistics"].items():
        for metric in METRIC_NAMES:
            for arm, c in s["comparisons"].items():
                if metric not in c:
                    continue
                d, p = c[metric]["iqm_difference"], c[metric]["probability_of_improvement"]
                sig = {(True, True): "yes (both)", (True, False): "IQM difference only",
                       (False, True): "P(better) only", (False, False): "no"}[d["significant"], p["significant"]]
                lines.append(f"| {quality} | {METRIC_NAMES[metric]} | {arm} | {_metric_ci(d, metric)} | "
                             f"{_ci(p, 1.0, 2)} | {sig} |")
    return "\n".join(lines)


def _share_of_paper_steps(steps: int) -> str:
    return f"{100 * steps / PAPER_BUDGET['steps']:.2g}% of the paper's steps"


def findings(report: dict) -> list[str]:
    """The "what this shows / does not show" bullets, each from the intervals of report["statistics"]."""
    shows, not_shown = [], []
    b, suite = report["budget"], report["suite"]
    for quality, s in report["statistics"].items():
        unresolved = []
        for arm, c in s["comparisons"].items():
            for metric, cm in c.items():
                p, d = cm["probability_of_improvement"], cm["iqm_difference"]
                numbers = f"P = {_ci(p, 1.0, 2)}, IQM difference {_metric_ci(d, metric)}"
                if p["significant"] or d["significant"]:
                    verdict = "better" if p["point"] > 0.5 else "worse"
                    which = ("" if p["significant"] and d["significant"] else
                             " by the IQM difference only" if d["significant"] else " by P(better) only")
                    shows.append(f"{quality}: {REFERENCE_ARM} is {verdict} than {arm} on {METRIC_NAMES[metric]}"
                                 f"{which} ({numbers}).")
                else:
                    unresolved.append(f"{arm} on {METRIC_NAMES[metric]} ({numbers})")
        if unresolved:
            not_shown.append(f"{quality}: any difference between {REFERENCE_ARM} and " + "; ".join(unresolved)
                             + " (each interval includes no difference).")
        if "random-masks" in s["comparisons"]:
            mech = s["comparisons"]["random-masks"]["success"]["probability_of_improvement"]
            (shows if mech["significant"] else not_shown).append(
                f"{quality}: that the harmony mask update itself (harmodt against the same per-task masks never "
                "updated) " + ("changes success" if mech["significant"] else "changes success: these runs cannot "
                               "resolve it") + f" (P = {_ci(mech, 1.0, 2)}).")
        against = []
        for arm, est in s["arms"].items():
            low_high = PAPER.get(suite, {}).get(quality, {}).get(arm)
            if low_high is not None:
                mean = est["success"]["mean"]
                where = ("below" if 100 * mean["high"] < low_high[0] else "above" if 100 * mean["low"] > low_high[1]
                         else "consistent with")
                against.append(f"{arm} {_ci(mean)} is {where} {paper_cell(suite, quality, arm)}")
        if against:
            shows.append(f"{quality}, mean success (%) against the published numbers: " + "; ".join(against)
                         + f" (at {_share_of_paper_steps(b['steps'])}, on other data: a gap measures the budget as "
                         "much as the method).")
    seeds = max(len(a["seeds"]) for per in report["summary"].values() for a in per.values())
    not_shown.append(f"Variation beyond training seeds and tasks: every interval is over {len(b['tasks'])} tasks x "
                     f"{seeds} seeds of one dataset per quality (data seed {b['data_seed']}), not over data "
                     "collection.")
    return (["**What this shows.**", ""] + [f"- {x}" for x in shows or ["no difference between arms that is "
                                                                        "significant at 95%."]]
            + ["", "**What this does not show.**", ""] + [f"- {x}" for x in not_shown])


def render_markdown(report: dict, figures: dict | None = None) -> str:
    b, summary = report["budget"], report["summary"]
    arms = list(next(iter(summary.values())))
    lines = [f"# Reproduction: {report['suite']}", "",
             f"Written {report['written']} by `harmodt-fast reproduce` from the runs' files "
             f"(`runs/<quality>/<arm>/seed<k>/`: `evaluation_step<N>.json`, `metrics.jsonl`, `action_mse.json`).", "",
             f"Tasks ({len(b['tasks'])}): {', '.join(short_name(t) for t in b['tasks'])}.", "",
             "## Budget, and how it differs from the paper's", "", *budget_lines(report), "",
             "## Final success (%) per arm", "",
             "IQM: the interquartile mean over tasks x seeds; [95% CI]: percentile stratified bootstrap over tasks x "
             "seeds (Agarwal et al. 2021); best: the running best of the periodic evaluations (what the published "
             "code reports), mean ± sample std over seeds.", "", success_table(report), "", paper_note(report)]
    if "expert_data" in report:
        e = report["expert_data"]
        lines += ["", "## Held-out action MSE on expert episodes", "",
                  "The final model's teacher-forced action MSE (its training loss) per task on "
                  f"{e['episodes_per_task']} expert episodes per task it never trained on (data seed {e['seed']}, "
                  f"`{e['path']}`), states normalised with the run's statistics, prompts as the run acts; lower is "
                  "better.", "",
                  "| quality | arm | IQM [95% CI] | mean [95% CI] |", "| --- | --- | --- | --- |"]
        for quality, s in report["statistics"].items():
            for arm, est in s["arms"].items():
                lines.append(f"| {quality} | {arm} | {_metric_ci(est['action_mse']['iqm'], 'action_mse')} | "
                             f"{_metric_ci(est['action_mse']['mean'], 'action_mse')} |")
    if any(s["comparisons"] for s in report["statistics"].values()):
        lines += ["", f"## {REFERENCE_ARM} against every other arm", "",
                  "Independent stratified bootstraps of both arms; IQM difference in success points (MSE: in MSE, "
                  f"negative is {REFERENCE_ARM} better); P({REFERENCE_ARM} better): the probability of improvement "
                  "(per task the share of run pairs it wins, ties half; mean over tasks). Significant: the 95% "
                  "interval excludes 0 (difference) or 0.5 (probability).", "", comparison_table(report)]
    lines += ["", "## What this shows, and what it does not", "", *findings(report)]
    for quality in summary:
        lines += ["", f"## Per task, {quality}: final success (%), mean over seeds", "",
                  "| task | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
        for task in b["tasks"]:
            cells = []
            for arm in arms:
                vals = [r["per_task"][task]["final"] for r in report["runs"]
                        if (r["quality"], r["arm"]) == (quality, arm)]
                cells.append(f"{100 * np.mean(vals):.0f}" if vals else "-")
            lines.append(f"| {short_name(task)} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "",
              "Per run: success (%), the last training loss (action MSE on training batches), the held-out action "
              "MSE, and for HarmoDT what its mask updates saw: the flips made, the mean share of entries whose task "
              "gradient conflicts with the mean gradient (a_t < 0), and the masks' mean pairwise overlap (Jaccard) "
              "at the last update.", "",
              "| quality | arm | seed | final | best | best step | curve (step: success) | loss | held-out MSE | "
              "flips | conflict | overlap |", "| --- |" + " --- |" * 11]
    for r in report["runs"]:
        curve = ", ".join(f"{s}: {100 * v:.0f}" for s, v in r["curve"])
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
        mse = f"{r['action_mse']['mean']:.4f}" if "action_mse" in r else "-"
        masks = (f"{r['flips']} | {r['mean_conflict_fraction']:.3f} | {r['final_mean_overlap']:.3f}"
                 if "flips" in r else "- | - | -")
        lines.append(f"| {r['quality']} | {r['arm']} | {r['seed']} | {100 * r['final_success']:.0f} | "
                     f"{100 * r['best_success']:.0f} | {r['best_step']} | {curve} | {loss} | {mse} | {masks} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"- {name}: `{path}`" for name, path in figures.items()]
    return "\n".join(lines) + "\n"
