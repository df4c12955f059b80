"""harmodt_fast: HarmoDT (Harmony Multi-Task Decision Transformer) made fast.

Importing is light: torch and the pure-Python modules only; the C++ extension and the Triton kernels are loaded
by the first op that needs them.
"""
import importlib
import os

from harmodt_fast.threads import apply_cpu_wait_policy

apply_cpu_wait_policy()  # before torch loads its OpenMP runtime (harmodt_fast/threads.py says why)

# In a source checkout the Triton kernels and the benchmarks sit in the top-level kernels/ and benchmarks/ folders
# (setup.py installs them as harmodt_fast.kernels and harmodt_fast.benchmarks); let the package find them there too.
_here = os.path.dirname(os.path.abspath(__file__))
if any(not os.path.isdir(os.path.join(_here, sub)) and os.path.isfile(os.path.join(os.path.dirname(_here), sub,
                                                                                  "__init__.py"))
       for sub in ("kernels", "benchmarks")):
    __path__.append(os.path.dirname(_here))  # noqa: F821  (package __path__)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "HarmoDTConfig": "harmodt_fast.config",
    "PRESETS": "harmodt_fast.config",
    "HarmoDT": "harmodt_fast.model",
    "MaskedLinear": "harmodt_fast.model",
    "TaskMasks": "harmodt_fast.masks",
    "TASK_SETS": "harmodt_fast.tasks",
    "Batch": "harmodt_fast.batch",
    "Prompt": "harmodt_fast.batch",
    "train": "harmodt_fast.trainer",
    "plan": "harmodt_fast.memory_plan",
    "MemoryPlan": "harmodt_fast.memory_plan",
    "TrainResult": "harmodt_fast.trainer",
    "evaluate": "harmodt_fast.evaluation",
    "reproduce": "harmodt_fast.reproduction",
    "load_policy": "harmodt_fast.policy",
    "Policy": "harmodt_fast.policy",
    "export": "harmodt_fast.export_policy",
    "Callback": "harmodt_fast.callbacks",
    "StopAtSuccess": "harmodt_fast.callbacks",
    "collect": "harmodt_fast.data",
    "load_dataset": "harmodt_fast.data",
    "DatasetError": "harmodt_fast.data",
    "MultiTaskSampler": "harmodt_fast.data",
    "CheckpointError": "harmodt_fast.run_checks",
    "TrainingError": "harmodt_fast.run_folder",
    "DivergenceError": "harmodt_fast.run_folder",
}

_SUBMODULES = {"ops", "demo", "bench", "batch", "data", "envs", "checkpoint", "plots", "evaluation", "trainer", "masks",
               "policy", "loggers", "model", "config", "tasks", "reproduction", "activation_memory",
               "memory_plan", "method", "task_gradients", "run_checks", "run_folder", "callbacks", "export_policy",
               "report_stats", "action_mse", "suite_report"}

__all__ = sorted(_EXPORTS) + ["ops"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"harmodt_fast.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harmodt_fast' has no attribute {name!r}")
