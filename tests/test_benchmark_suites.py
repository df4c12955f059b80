"""The pytest-benchmark suites in benchmarks/ run in their quick mode (tiny shapes), so they never rot: every
benchmark runs, times something and reports its FLOPs and bytes."""
import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
BENCH = os.path.join(BENCHMARKS, "test_bench_suites.py")


def test_benchmark_suites_run_in_quick_mode(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HARMODT_BENCH_QUICK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", BENCH, "--benchmark-enable", "--benchmark-min-rounds=2",
         "--benchmark-max-time=0.01", "--benchmark-warmup=off", f"--benchmark-json={out}", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}
    assert set(results) == {"test_bench_sampler", "test_bench_harmony_update", "test_bench_evaluation_step"}
    for name, b in results.items():
        assert b["stats"]["rounds"] >= 2 and b["stats"]["median"] > 0, name
        assert b["extra_info"]["quick"] is True and b["extra_info"]["bytes"] > 0, name
        assert b["extra_info"]["flops"] >= 0, name
    assert results["test_bench_harmony_update"]["extra_info"]["flops"] > 0
    assert results["test_bench_evaluation_step"]["extra_info"]["flops"] > 0


def test_op_and_train_step_suites_run_and_render(tmp_path):
    """The masked-matmul and training-step suites run side by side in quick mode; the render script turns the
    JSON into tables (one per group, ratios to ours) and a plot, and fills a README section."""
    out = tmp_path / "ops.json"
    env = {**os.environ, "HARMODT_BENCH_QUICK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", os.path.join(BENCHMARKS, "test_bench_ops.py"), "--benchmark-enable",
         "--benchmark-min-rounds=2", "--benchmark-max-time=0.01", "--benchmark-warmup=off",
         f"--benchmark-json={out}", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    groups = {}
    for b in json.loads(out.read_text())["benchmarks"]:
        groups.setdefault(b["extra_info"]["group"], []).append(b["extra_info"]["impl"])
    assert groups == {"masked_linear": ["ours", "dense", "materialise-per-task"], "train_step": ["ours", "published"],
                      "mask_init": ["random_subset", "torch.randperm"], "dropout": ["ours", "torch"]}
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:begin -->\nold\n<!-- bench:end -->\ny\n")
    proc = subprocess.run([sys.executable, "-m", "harmodt_fast.benchmarks.render_benchmarks", str(out),
                           "--readme", str(readme)], cwd=os.path.dirname(BENCHMARKS), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = (tmp_path / "ops.md").read_text()
    assert "**masked_linear**" in tables and "| materialise-per-task |" in tables and "**train_step**" in tables
    assert (tmp_path / "ops.png").stat().st_size > 0
    text = readme.read_text()
    assert "old" not in text and "| published |" in text and text.startswith("x\n") and text.endswith("y\n")


def test_bench_names_every_runnable_module_of_the_package():
    """`harmodt-fast bench NAME` reaches every module of harmodt_fast.benchmarks that has main(argv), and only
    those; the package imported as harmodt_fast.benchmarks (the source folder through the source-checkout hook,
    or its installed copy) holds every module of benchmarks/."""
    import ast

    import harmodt_fast.benchmarks
    from harmodt_fast.bench import BENCHMARKS as NAMED, TOOLS

    def modules(folder):
        return {name for name in os.listdir(folder) if name.endswith(".py")}

    assert modules(os.path.dirname(harmodt_fast.benchmarks.__file__)) == modules(BENCHMARKS)
    runnable = {name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py") and any(
        isinstance(node, ast.FunctionDef) and node.name == "main"
        for node in ast.parse(open(os.path.join(BENCHMARKS, name)).read()).body)}
    assert runnable == set(NAMED) | set(TOOLS)
    assert not set(NAMED) & set(TOOLS)


def test_bench_command_runs_a_named_benchmark(capsys):
    """`harmodt-fast bench NAME ARGS` is that module's main(ARGS); the side-by-side's options with a NAME are an
    error, not silently dropped."""
    from harmodt_fast.benchmarks.device_ceilings import source_digest
    from harmodt_fast.cli import main

    assert main(["bench", "device_ceilings", "--digest"]) == 0
    assert capsys.readouterr().out.strip() == source_digest()
    assert main(["bench", "--tasks", "3", "device_ceilings", "--digest"]) == 2
    assert "side-by-side" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--help"])
    assert stop.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in ("kernels", "train_step", "scale", "evaluation", "sampler",
                                                   "collect", "harmony", "precompile"))
