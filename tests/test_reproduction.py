"""hf.reproduce end to end on a tiny suite: data, every (quality, arm, seed), held-out action MSE, statistics and
report from the runs' files, resume of a killed suite, the budget and argument checks, the CLI's options."""
import json
import os
import shutil

import numpy as np
import pytest
import yaml

import harmodt_fast as hf
from harmodt_fast.cli import main
from harmodt_fast.reproduction import rebuild_report
from harmodt_fast.report_stats import iqm
from harmodt_fast.suite_markdown import render_markdown
from harmodt_fast.suite_report import read_evaluations

TASKS = ["reach-v3", "button-press-v3"]
KW = dict(qualities=("near-optimal", "sub-optimal"), arms=("harmodt", "random-masks", "mtdt", "harmodt-flip"),
          seeds=(0, 1),
          steps=4, preset="tiny", episodes_per_task=4, eval_episodes=1, eval_every=2, eval_max_steps=15,
          episode_steps=30, flip_fraction=0.1, expert_episodes=2, bootstrap_reps=200, workers=0, progress=False,
          mask_interval=2, precision="fp32")
ARMS = ("harmodt", "random-masks", "mtdt", "harmodt-flip0.1")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return out, hf.reproduce(TASKS, str(out), **KW)


def test_report_holds_every_run_and_matches_the_evaluation_files(suite):
    out, report = suite
    assert report == json.load(open(out / "report.json"))
    assert len(report["runs"]) == 2 * 4 * 2
    assert {(r["quality"], r["arm"], r["seed"]) for r in report["runs"]} == {
        (q, a, s) for q in KW["qualities"] for a in ARMS for s in KW["seeds"]}
    for run in report["runs"]:
        assert run["run_dir"] == os.path.join("runs", run["quality"], run["arm"], f"seed{run['seed']}")
        evals = read_evaluations(out / run["run_dir"])
        assert [e["step"] for e in evals] == [2, 4]
        assert run["final_success"] == evals[-1]["mean_success"]
        assert run["best_success"] == max(e["mean_success"] for e in evals)
        best = next(e for e in evals if e["step"] == run["best_step"])
        assert run["best_success"] == best["mean_success"]
        assert run["per_task"] == {t: {"final": evals[-1]["per_task"][t]["success_rate"],
                                       "best": best["per_task"][t]["success_rate"]} for t in TASKS}
        cached = json.load(open(out / run["run_dir"] / "action_mse.json"))
        assert run["action_mse"] == {"mean": cached["mean"], "per_task": cached["per_task"]}
        assert cached["steps"] == {t: 2 * 30 for t in TASKS} and cached["checkpoint_step"] == 4
    for quality, per_arm in report["summary"].items():
        for arm, s in per_arm.items():
            finals = [r["final_success"] for r in report["runs"] if r["quality"] == quality and r["arm"] == arm]
            assert s["seeds"] == [0, 1] and s["final_mean"] == pytest.approx(sum(finals) / 2)
    # sub-optimal data is the first half of the near-optimal buffer; held-out expert data from the next data seed
    assert report["budget"]["episodes_per_task"] == {"near-optimal": 4, "sub-optimal": 2}
    assert report["expert_data"] == {"path": os.path.join("data", "2-tasks-expert-2ep-30steps-seed1"),
                                     "episodes_per_task": 2, "seed": 1}
    md = open(out / "report.md").read()
    assert "| near-optimal | harmodt | 2 |" in md and "| sub-optimal | harmodt-flip0.1 | 2 |" in md
    assert "What this shows" in md and "What this does not show" in md
    assert "sub-optimal: that the harmony mask update itself (harmodt against the same per-task masks never updated)" in md and "0.0004% of the paper's steps" in md
    for name in ("success_vs_step.png", "per_task.png", "performance_profile.png", "iqm.png",
                 "mask_overlap_near-optimal.png", "task_agreement_sub-optimal.png"):
        assert os.path.getsize(out / "plots" / name) > 0


def test_the_flip_arm_is_harmodt_with_the_flip_fraction(suite):
    out, report = suite
    for quality in KW["qualities"]:
        config = yaml.safe_load(open(out / "runs" / quality / "harmodt-flip0.1" / "seed0" / "config.yaml"))
        assert config["method"] == "harmodt" and config["flip_fraction"] == 0.1
        plain = yaml.safe_load(open(out / "runs" / quality / "harmodt" / "seed0" / "config.yaml"))
        assert plain["flip_fraction"] == 0.0
        runs = {r["arm"]: r for r in report["runs"] if r["quality"] == quality and r["seed"] == 0}
        assert runs["harmodt-flip0.1"]["flips"] > runs["harmodt"]["flips"]  # 10% of the active weights per update
        assert "flips" not in runs["mtdt"] and "flips" not in runs["random-masks"]  # its masks are never updated


def test_statistics_are_those_of_the_per_task_scores(suite):
    _, report = suite
    for quality, s in report["statistics"].items():
        for arm in ARMS:
            runs = [r for r in report["runs"] if r["quality"] == quality and r["arm"] == arm]
            success = np.array([[r["per_task"][t]["final"] for t in TASKS] for r in runs])
            mse = np.array([[r["action_mse"]["per_task"][t] for t in TASKS] for r in runs])
            est = s["arms"][arm]
            assert est["success"]["iqm"]["point"] == pytest.approx(iqm(success))
            assert est["success"]["mean"]["point"] == pytest.approx(success.mean())
            assert est["action_mse"]["iqm"]["point"] == pytest.approx(iqm(mse))
            for metric in ("success", "action_mse"):
                for agg in ("iqm", "mean"):
                    e = est[metric][agg]
                    assert e["low"] <= e["point"] + 1e-12 and e["point"] <= e["high"] + 1e-12
        assert set(s["comparisons"]) == {"random-masks", "mtdt", "harmodt-flip0.1"}
        for c in s["comparisons"].values():
            assert set(c) == {"success", "action_mse"}
            assert 0.0 <= c["success"]["probability_of_improvement"]["point"] <= 1.0
        assert s["profile"]["harmodt"]["taus"][0] == 0.0 and s["profile"]["harmodt"]["fraction"][0] == 1.0


def test_the_report_rebuilds_from_the_files(suite, tmp_path):
    # a copy of the suite without its checkpoints: every number must come from the files the report names
    out, report = suite
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint.pt", "*.npz"))
    assert not list(copy.rglob("checkpoint.pt"))
    again = rebuild_report(str(copy), bootstrap_reps=200)
    drop = lambda r: {k: v for k, v in r.items() if k not in ("written", "machine")}  # noqa: E731
    assert drop(again) == drop(report)
    md = open(copy / "report.md").read()
    assert "## harmodt against every other arm" in md and "skipped: no checkpoint.pt in runs/near-optimal" in md
    # a report of the first format (methods, no arms) rebuilds with arms = methods
    old = json.load(open(copy / "report.json"))
    old["format"] = "harmodt_fast.reproduce/1"
    old["runs"] = [{k: v for k, v in r.items() if k != "arm"} for r in old["runs"] if r["arm"] in ("harmodt", "mtdt")]
    del old["expert_data"]
    json.dump(old, open(copy / "report.json", "w"))
    first = rebuild_report(str(copy), bootstrap_reps=200)
    assert list(first["summary"]["near-optimal"]) == ["harmodt", "mtdt"] and "action_mse" not in first["runs"][0]
    assert first["summary"] == {q: {a: s for a, s in per.items() if a in ("harmodt", "mtdt")}
                                for q, per in report["summary"].items()}


def test_the_paper_column_gives_every_published_number():
    # the markdown of a report dict whose suite is MT5 / MT50 (its runs' numbers do not matter here)
    est = {"point": 0.5, "low": 0.4, "high": 0.6}
    arm = {"success": {"iqm": est, "mean": est}}
    report = {"suite": "MT5", "budget": {"tasks": TASKS, "preset": "tiny", "steps": 1000, "overrides": {},
                                         "episodes_per_task": {"near-optimal": 4, "sub-optimal": 2},
                                         "episode_steps": 30, "data_seed": 0, "eval_episodes": 1, "eval_max_steps": 15},
              "machine": {"cpu": "x", "cpus": 2, "gpu": None, "torch": "2"}, "written": "now", "runs": [],
              "summary": {"near-optimal": {a: {"final_mean": 0.5, "final_std": 0.1, "best_mean": 0.5, "best_std": 0.1,
                                               "seeds": [0]} for a in ("harmodt", "prompt-dt", "mtdt")}},
              "statistics": {"near-optimal": {"arms": {a: arm for a in ("harmodt", "prompt-dt", "mtdt")},
                                              "profile": {}, "comparisons": {}}}}
    md = render_markdown(report)
    for a in ("harmodt", "prompt-dt", "mtdt"):
        assert f"| near-optimal | {a} | 1 | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | 50.0 ± 10.0 | 50.0 ± 10.0 | 100 |" in md
    assert "sub-optimal: harmodt 68-75, prompt-dt 67, mtdt 64.7" in md and "MT5 cannot rank them" in md
    assert "mean success (%) against the published numbers: harmodt 50.0 [40.0, 60.0] is below 100; " in md
    report["suite"] = "MT50"
    md = render_markdown(report)
    assert "near-optimal: harmodt 77.8-78.8, prompt-dt 71.6, mtdt 65.8, random-masks 74.2" in md
    assert "| near-optimal | mtdt | 1 | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | 50.0 ± 10.0 | 50.0 ± 10.0 | 65.8 |" in md
    assert "0.1% of the paper's steps" in md and "| training steps per run | 1,000 " in md


def test_a_killed_suite_continues_where_it_stopped(suite):
    out, report = suite
    victim = out / "runs" / "sub-optimal" / "harmodt" / "seed1"
    os.remove(victim / "evaluation_step4.json")  # as if killed during its last evaluation
    os.remove(victim / "action_mse.json")
    kept = out / "runs" / "near-optimal" / "mtdt" / "seed0"
    mtimes = [os.path.getmtime(kept / name) for name in ("checkpoint.pt", "action_mse.json")]
    again = hf.reproduce(TASKS, str(out), **KW)
    assert os.path.isfile(victim / "evaluation_step4.json") and os.path.isfile(victim / "action_mse.json")
    assert [os.path.getmtime(kept / name) for name in ("checkpoint.pt", "action_mse.json")] == mtimes
    assert again["summary"] == report["summary"]  # evaluation is deterministic
    assert again["statistics"] == report["statistics"]
    drop_wall = lambda runs: [{k: v for k, v in r.items() if k != "wall_s"} for r in runs]  # noqa: E731
    assert drop_wall(again["runs"]) == drop_wall(report["runs"])


def test_bad_arguments_are_refused_before_any_work(suite, tmp_path):
    out, _ = suite
    with pytest.raises(ValueError, match="another budget.*steps"):
        hf.reproduce(TASKS, str(out), **{**KW, "steps": 6})
    # a changed default of the code changes the budget too (the folder's runs were trained under the old one)
    budget = json.load(open(out / "budget.json"))
    budget["config"]["prompt_source"] = "held-out"
    json.dump(budget, open(tmp_path / "budget.json", "w"))
    with pytest.raises(ValueError, match=r"differs in config.prompt_source\)"):
        hf.reproduce(TASKS, str(tmp_path), **KW)
    with pytest.raises(ValueError, match="unknown arm 'dt'"):
        hf.reproduce(TASKS, str(tmp_path / "a"), **{**KW, "arms": ("dt",)})
    with pytest.raises(ValueError, match=r"\['method'\] are set by the arms"):
        hf.reproduce(TASKS, str(tmp_path / "b"), **{**KW, "method": "mtdt"})
    with pytest.raises(ValueError, match="methods= is now arms="):
        hf.reproduce(TASKS, str(tmp_path / "a"), **KW, methods=("harmodt",))
    with pytest.raises(ValueError, match="flip_fraction must be in"):
        hf.reproduce(TASKS, str(tmp_path / "c"), **{**KW, "flip_fraction": 0.0})
    with pytest.raises(ValueError, match="arm harmodt: unknown config field"):
        hf.reproduce(TASKS, str(tmp_path / "d"), **{**KW, "no_such_field": 1})
    assert not any(os.path.exists(tmp_path / n) for n in "abcd")


def test_cli_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--arms", "random-masks (the same per-task masks, never updated)", "--flip-fraction",
                   "--expert-episodes", "--bootstrap-reps"):
        assert option in text


def test_cli_continues_the_suite_and_prints_every_arm(suite, capsys):
    out, report = suite
    args = ["reproduce", "--suite", ",".join(TASKS), "--out", str(out), "--arms", ",".join(KW["arms"]),
            "--seeds", "0,1", "--steps", "4", "--preset", "tiny", "--episodes", "4", "--eval-episodes", "1",
            "--eval-every", "2", "--eval-max-steps", "15", "--episode-steps", "30", "--flip-fraction", "0.1",
            "--expert-episodes", "2", "--bootstrap-reps", "200", "--workers", "0", "--no-progress",
            "--set", "mask_interval=2", "--set", "precision=fp32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for quality in KW["qualities"]:
        for arm in ARMS:
            iqm_ = report["statistics"][quality]["arms"][arm]["success"]["iqm"]
            assert f"{quality:13s} {arm:18s} final IQM {100 * iqm_['point']:5.1f}" in printed
    assert printed.count(": done, kept") == len(report["runs"]) and ": training" not in printed
