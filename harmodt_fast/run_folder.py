"""The run folder's rules: one process trains in it at a time (its lock), what a start does with what a killed run
left (temporary files, a log line cut short), and the errors of a run that cannot go on. Torch-free, so that the
CLI can name these errors without importing torch."""
from __future__ import annotations

import os
import warnings

from harmodt_fast._io import FolderLock, atomic_write, read_json_lines, remove_stale_temporaries


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason outside its config and data: its folder is in use by another process,
    a file of it cannot be written (a full disk) or its log is damaged. The message names the folder or file."""


class DivergenceError(TrainingError):
    """A step whose loss or gradient is not finite (`step`; `tasks`: those whose loss was not), or weights that are
    not: the checkpoint on disk is the last one with finite weights."""

    def __init__(self, message: str, step: int, tasks: list[str]):
        super().__init__(message)
        self.step, self.tasks = step, tasks


class TrainingStopped(KeyboardInterrupt):
    """A run stopped by a signal (`signal`: its number; None when another data-parallel rank got it) after
    writing its checkpoint."""

    def __init__(self, message: str, signal_number: int | None):
        super().__init__(message)
        self.signal = signal_number


def lock(folder: str) -> FolderLock:
    """The run folder's lock (not yet taken): a folder in use raises TrainingError naming it and its holder."""
    return FolderLock(folder, TrainingError)


def hold(folder_lock: FolderLock) -> None:
    """Takes the run folder (a no-op when held already) and removes the temporary files of writes a kill cut
    short there, with a warning each."""
    folder_lock.acquire()
    for path in remove_stale_temporaries(folder_lock.folder):
        warnings.warn(f"removed {path}: a temporary file left by a run killed while writing", stacklevel=3)


def truncate_log(path: str, step: int) -> None:
    """Drops the lines of the log `path` written after `step` (a resumed run redoes those steps), and a last line
    cut short (with a warning; a damaged line before it: TrainingError naming the file and line)."""
    if not os.path.exists(path):
        return
    kept = [line for line, entry in read_json_lines(path, TrainingError)
            if not isinstance(entry.get("step"), int) or entry["step"] <= step]
    try:
        atomic_write(path, lambda f: f.writelines(kept), binary=False)
    except OSError as exc:
        raise TrainingError(str(exc)) from exc


def folder_of(path) -> str:
    """The run folder a path names: the path itself when it is a folder, else (a checkpoint file) its folder."""
    path = os.fspath(path)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


CONFIG_NAME = "config.yaml"  # the run's resolved config: `harmodt-fast train --config RUN/config.yaml` reruns it


def write_config(folder: str, config) -> str:
    """Writes the run's whole config (a HarmoDTConfig) as `folder`/config.yaml, atomically; a write that fails
    raises TrainingError naming the file."""
    text = config.to_yaml("this run's config, every field (preset, config file and overrides resolved); to rerun "
                          "it:\nharmodt-fast train DATA --out NEW_RUN --config RUN/config.yaml")
    try:
        return atomic_write(os.path.join(folder, CONFIG_NAME), lambda f: f.write(text), binary=False)
    except OSError as exc:
        raise TrainingError(str(exc)) from exc


def prepare(out) -> str:
    """The run folder's absolute path, created; a folder that cannot be written raises ValueError naming it."""
    out = os.path.abspath(os.fspath(out))
    probe = os.path.join(out, f".write-test-{os.getpid()}")  # per process: data-parallel ranks share out
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as exc:
        raise ValueError(f"cannot write to the output folder {out}: {exc}") from exc
    finally:
        if os.path.exists(probe):  # also when the write failed (a full disk)
            os.unlink(probe)
    return out
