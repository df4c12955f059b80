"""Offline datasets: collection from Meta-World's scripted experts, loading (ours and the MTDiff layout) and the
mixed-task sampler."""
import importlib

from harmodt_fast.data.collection import QUALITIES, collect
from harmodt_fast.data.dataset import Dataset, DatasetError, TaskData, load_dataset

__all__ = ["QUALITIES", "Dataset", "DatasetError", "MultiTaskSampler", "TaskData", "collect", "load_dataset",
           "returns_to_go"]


def __getattr__(name):
    # the sampler needs torch; collection workers import this package and should not pay for it
    if name in ("MultiTaskSampler", "returns_to_go"):
        return getattr(importlib.import_module("harmodt_fast.data.sampler"), name)
    raise AttributeError(f"module 'harmodt_fast.data' has no attribute {name!r}")
