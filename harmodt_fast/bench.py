"""`harmodt-fast bench [NAME [ARGS...]]`: the benchmarks of harmodt_fast.benchmarks (the top-level benchmarks/
folder of the source tree) by name. Without a name the command runs the quick side-by-side
(harmodt_fast.benchmarks.side_by_side); with one, that module's main(ARGS), the same as
`python -m harmodt_fast.benchmarks.NAME ARGS...`. The benchmarks sit above every other module (they import the
package root, the CLI's helpers): this is the one place that reaches them, by name, when one runs.
"""
from __future__ import annotations

import importlib

# name -> what it measures; each is a module of harmodt_fast.benchmarks with main(argv)
BENCHMARKS = {
    "kernels": "masked matmul, attention and MLP kernels vs cuBLAS dense and materialising (CUDA; --smoke on CPU)",
    "train_step": "the training step: ours vs plain PyTorch, the published procedure, unmasked prompt-dt",
    "scale": "the training step and the mask update against the task count; runs at hundreds of tasks",
    "evaluation": "batched MT50 evaluation vs the published one-environment-at-a-time loop",
    "sampler": "MultiTaskSampler.sample() vs a per-sample loop like the published code's",
    "collect": "collection speed: hf.collect vs a bare scripted-policy loop",
    "harmony": "the harmony mask update at the paper scale: time and peak memory",
    "device_ceilings": "this device's ceilings: bf16 and fp32 matmul, copy bandwidth",
    "expert_success": "the expert collection level's success rate on every MT50 task",
    "quality_ramp": "success and return of episodes at expert-action probability p",
}
# name -> what it does: the tools around the benchmarks, run the same way
TOOLS = {
    "gpu_summary": "folds the GPU run's stage outputs into summary.json and summary.md",
    "kernel_variants": "counts the Triton kernel variants a command compiles",
    "precompile": "compiles the GPU run's Triton kernels for sm_90 without a GPU",
    "published_agreement": "trains the published HarmoDT code and ours in lockstep and compares losses, weights, masks",
    "render_benchmarks": "renders a pytest-benchmark JSON into markdown tables and a plot",
    "scaling_table": "rewrites the memory and communication table of docs/scaling.md",
}


def listing() -> str:
    """The names and what each measures or does, for `harmodt-fast bench --help`."""
    width = max(map(len, {**BENCHMARKS, **TOOLS}))
    lines = ["benchmarks:"] + [f"  {n:<{width}}  {what}" for n, what in BENCHMARKS.items()]
    lines += ["tools:"] + [f"  {n:<{width}}  {what}" for n, what in TOOLS.items()]
    return "\n".join(lines)


def _module(name: str):
    return importlib.import_module(f"harmodt_fast.benchmarks.{name}")


def run(name: str, argv: list[str]) -> int:
    """Runs harmodt_fast.benchmarks.<name>'s main(argv); its exit status."""
    if name not in BENCHMARKS and name not in TOOLS:
        raise ValueError(f"no benchmark {name!r}; one of {', '.join([*BENCHMARKS, *TOOLS])}")
    return _module(name).main(list(argv)) or 0


def side_by_side(**options) -> dict:
    """`harmodt-fast bench` without a name: harmodt_fast.benchmarks.side_by_side.run_bench(**options)."""
    return _module("side_by_side").run_bench(**options)
