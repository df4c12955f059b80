"""benchmarks/gpu_run.sh --dry-run: both commands of the first GPU run, every stage, on the CPU interpreter at tiny
shapes, so that the script a scarce GPU slot depends on does not rot."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: str, out) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "TRITON_CACHE_DIR": str(out / "triton-cache")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this test's python
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), cmd, "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)


def stages(out) -> dict:
    return {name: int(rc) for name, rc, _ in (line.split() for line in open(out / "stages.txt"))}


def test_command_1_dry_run(tmp_path):
    res = run("1", tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert stages(tmp_path) == {"tests": 0, "train_step": 0}
    env = (tmp_path / "env.txt").read_text()
    assert "commit:" in env and "torch" in env and "dry run" in env
    assert 'failures="0"' in (tmp_path / "tests.xml").read_text()
    (table,) = [p for p in os.listdir(tmp_path) if p.startswith("train_step_cpu_tiny_T2") and p.endswith(".json")]
    rows = {r["path"]: r for r in json.load(open(tmp_path / table))["rows"]}
    assert rows["ours (eager)"]["masked_linear_backend"] == "triton"  # --set backend=triton reached the trainer
    assert rows["published procedure (re-implemented), fp32"]["sequences_per_s"] > 0
    assert any(p.startswith("ours mask update") for p in rows)


def test_command_2_dry_run(tmp_path):
    pytest.importorskip("metaworld")
    res = run("2", tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert stages(tmp_path) == {"kernels": 0, "scale": 0, "eval": 0}
    assert any(p.startswith("kernels_") and p.endswith(".json") for p in os.listdir(tmp_path))
    scale = [json.loads(line) for line in open(tmp_path / "scale" / "results.jsonl")]
    assert {r["name"] for r in scale} == {"sweep-step-T2", "sweep-update-streamed-T2", "sweep-update-whole-T2"}
    assert all("error" not in r for r in scale) and (tmp_path / "scale" / "results.md").exists()
    assert any(p.startswith("evaluation_cpu") for p in os.listdir(tmp_path))
