"""hf.reproduce end to end on a tiny suite: data, every (quality, method, seed), report from the runs' files,
resume of a killed suite."""
import json
import os

import pytest

import harmodt_fast as hf
from harmodt_fast.reproduction import read_evaluations

TASKS = ["reach-v3", "button-press-v3"]
KW = dict(qualities=("near-optimal", "sub-optimal"), methods=("harmodt", "mtdt"), seeds=(0, 1), steps=4,
          preset="tiny", episodes_per_task=4, eval_episodes=1, eval_every=2, eval_max_steps=15, episode_steps=30,
          workers=0, progress=False, mask_interval=2, precision="fp32")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return out, hf.reproduce(TASKS, str(out), **KW)


def test_report_holds_every_run_and_matches_the_evaluation_files(suite):
    out, report = suite
    assert report == json.load(open(out / "report.json"))
    assert len(report["runs"]) == 2 * 2 * 2
    assert {(r["quality"], r["method"], r["seed"]) for r in report["runs"]} == {
        (q, m, s) for q in KW["qualities"] for m in KW["methods"] for s in KW["seeds"]}
    for run in report["runs"]:
        evals = read_evaluations(out / run["run_dir"])
        assert [e["step"] for e in evals] == [2, 4]
        assert run["final_success"] == evals[-1]["mean_success"]
        assert run["best_success"] == max(e["mean_success"] for e in evals)
        best = next(e for e in evals if e["step"] == run["best_step"])
        assert run["best_success"] == best["mean_success"]
        assert run["per_task"] == {t: {"final": evals[-1]["per_task"][t]["success_rate"],
                                       "best": best["per_task"][t]["success_rate"]} for t in TASKS}
    for quality, per_method in report["summary"].items():
        for method, s in per_method.items():
            finals = [r["final_success"] for r in report["runs"] if r["quality"] == quality and r["method"] == method]
            assert s["seeds"] == [0, 1] and s["final_mean"] == pytest.approx(sum(finals) / 2)
    # sub-optimal data is the first half of the near-optimal buffer
    assert report["budget"]["episodes_per_task"] == {"near-optimal": 4, "sub-optimal": 2}
    md = open(out / "report.md").read()
    assert "| near-optimal | harmodt | 2 |" in md and "| sub-optimal | mtdt | 2 |" in md
    for name in ("success_vs_step.png", "per_task.png", "mask_overlap_near-optimal.png",
                 "task_agreement_sub-optimal.png"):
        assert os.path.getsize(out / "plots" / name) > 0


def test_a_killed_suite_continues_where_it_stopped(suite):
    out, report = suite
    victim = out / "runs" / "sub-optimal" / "harmodt" / "seed1"
    os.remove(victim / "evaluation_step4.json")  # as if killed during its last evaluation
    kept = out / "runs" / "near-optimal" / "mtdt" / "seed0" / "checkpoint.pt"
    mtime = os.path.getmtime(kept)
    again = hf.reproduce(TASKS, str(out), **KW)
    assert os.path.isfile(victim / "evaluation_step4.json")
    assert os.path.getmtime(kept) == mtime  # finished runs are not redone
    assert again["summary"] == report["summary"]  # evaluation is deterministic
    drop_wall = lambda runs: [{k: v for k, v in r.items() if k != "wall_s"} for r in runs]  # noqa: E731
    assert drop_wall(again["runs"]) == drop_wall(report["runs"])


def test_other_budget_in_the_same_folder_is_refused(suite):
    out, _ = suite
    with pytest.raises(ValueError, match="another budget.*steps"):
        hf.reproduce(TASKS, str(out), **{**KW, "steps": 6})
    with pytest.raises(ValueError, match="unknown qualities/methods"):
        hf.reproduce(TASKS, str(out), **{**KW, "methods": ("dt",)})
