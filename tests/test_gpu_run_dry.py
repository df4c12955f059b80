"""benchmarks/gpu_run.sh --dry-run: the one GPU-run command, every stage, on the CPU interpreter at tiny shapes, so
that the script a scarce GPU slot depends on does not rot: stage order, the 9-minute budget, at most 8 result files
at most 2 folders deep, poisoned outputs only where correctness is checked, and a summary that holds every stage."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
ORDER = ["env", "tests", "train_step", "profile", "kernels", "scale", "eval", "train_compiled"]


def plan() -> tuple[dict, int]:
    lines = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, check=True).stdout.split("\n")
    rows = dict(line.split() for line in lines if line.strip())
    budget = int(rows.pop("budget"))
    return rows, budget


def test_stage_limits_fit_nine_minutes():
    rows, budget = plan()
    assert list(rows) == ORDER
    assert budget <= 540
    fixed = sum(int(v) for v in rows.values() if v != "rest")
    assert fixed <= budget - 30, f"fixed stage limits {fixed} s leave no room for kill grace and summaries"
    assert rows["train_compiled"] == "rest"  # the optional stage only takes what is left


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("metaworld")
    base = tmp_path_factory.mktemp("gpu_run")
    out, work = base / "out", base / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "TRITON_CACHE_DIR": str(base / "triton-cache"),
           "HARMODT_POISON": "1"}  # must not leak into the timing stages
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this test's python
    res = subprocess.run(["bash", SCRIPT, "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    return res, out, work


def test_dry_run_stages_in_order_and_pass(dry_run):
    res, out, work = dry_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    stages = [line.split() for line in open(work / "stages.tsv")]
    assert [s[0] for s in stages] == ORDER
    assert {s[0]: int(s[1]) for s in stages} == dict.fromkeys(ORDER, 0)
    assert all(int(a[3]) <= int(b[2]) for a, b in zip(stages, stages[1:]))  # each ended before the next began


def test_dry_run_brings_back_at_most_8_files(dry_run):
    _, out, _ = dry_run
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert sorted(files) == ["run.log", "summary.json", "summary.md", "tests.xml"]
    assert len(files) <= 8 and all(f.count(os.sep) <= 2 for f in files)


def test_only_the_tests_stage_poisons_outputs(dry_run):
    _, out, work = dry_run
    poisoned = {line.split()[0] for line in open(work / "stages.tsv") if line.split()[5] == "1"}
    assert poisoned == {"tests"}
    summary = json.load(open(out / "summary.json"))
    for key in ("train_step", "profile", "train_compiled"):
        assert summary[key]["poison"] is False, key
    assert summary["kernels"]["meta"]["poison"] is False


def test_summary_holds_every_stage(dry_run):
    _, out, _ = dry_run
    s = json.load(open(out / "summary.json"))
    assert s["env"]["ceilings"]["matmul_bf16_tflops"] > 0 and s["env"]["ceilings"]["copy_tbps"] > 0
    digest = subprocess.run([sys.executable, "-m", "harmodt_fast.benchmarks.device_ceilings", "--digest"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    assert s["env"]["source_sha256"] == digest  # names the code where the run has no git history
    assert s["tests"]["failed"] == 0 and s["tests"]["passed"] >= 1
    rows = {r["path"]: r for r in s["train_step"]["rows"]}
    assert rows["ours (eager)"]["masked_linear_backend"] == "triton"  # --set backend=triton reached the trainer
    assert [r["path"].split(" (")[0] for r in s["train_step"]["rows"]] == [
        "ours", "published procedure", "unmasked prompt-dt", "ours mask update", "published mask update"]
    assert rows["ours (eager)"]["fraction_of_matmul_ceiling"] > 0
    h = s["headline"]
    assert h["ours_vs_published"] > 0 and h["ours_vs_unmasked"] > 0 and h["mask_update_s"]["published"] > 0
    assert h["masked_matmul_vs_cublas"] and s["kernels"]["meta"]["ceilings"] == s["env"]["ceilings"]
    assert {r["name"] for r in s["scale"]} == {"sweep-step-T2", "sweep-update-streamed-T2", "sweep-update-whole-T2"}
    assert all("error" not in r for r in s["scale"])
    assert s["evaluation"]["ours"]["episodes_per_task"] == 1
    assert s["kernel_variants"]["variants"] > 5  # interpreted launches keyed as the JIT would compile them
    md = (out / "summary.md").read_text()
    for title in ("## Headline", "## Training step", "## Kernels", "## Scale", "## Kernel variants"):
        assert title in md
