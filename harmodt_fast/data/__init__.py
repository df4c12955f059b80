"""Offline datasets: collection from Meta-World's scripted experts, loading (ours and the MTDiff layout) and the
mixed-task sampler."""
import importlib

from harmodt_fast.data.collection import QUALITIES, collect
from harmodt_fast.data.dataset import Dataset, DatasetError, TaskData, load_folder

__all__ = ["QUALITIES", "Dataset", "DatasetError", "MultiTaskSampler", "TaskData", "collect", "load_dataset",
           "returns_to_go"]


def load_dataset(path, verify: bool = True, max_episodes: int | None = None) -> Dataset:
    """Opens a dataset: a folder of ours (manifest.json) or in the MTDiff layout (`{task}/{i}.npz`), or Minari
    data: "minari:<dataset_id>", a Minari dataset folder, or {task_name: dataset_id or folder}.

    Files are read, checked and cached per task on first use (`ds.episodes(task)` / `ds.arrays(task)`).
    verify: hash every file of our format against the manifest when it is read (sha256, ~1.7 GB/s).
    max_episodes: keep only the first n episodes of every task (the MTDiff "sub-optimal" split is the first half
    of each replay buffer).
    """
    from harmodt_fast.data.minari_data import is_minari_source, load_minari  # minari only when asked for

    if is_minari_source(path):
        if max_episodes is not None and max_episodes < 1:
            raise ValueError(f"max_episodes must be >= 1, got {max_episodes}")
        return load_minari(path, max_episodes)
    return load_folder(path, verify, max_episodes)


def __getattr__(name):
    # the sampler needs torch; collection workers import this package and should not pay for it
    if name in ("MultiTaskSampler", "returns_to_go"):
        return getattr(importlib.import_module("harmodt_fast.data.sampler"), name)
    raise AttributeError(f"module 'harmodt_fast.data' has no attribute {name!r}")
