"""Callbacks: user code the trainer calls during training, and the run folder's kept checkpoints.

A callback is any object with some of these methods (each optional; the trainer calls those present, on the
data-parallel rank 0 only):
    on_log(trainer, entry)          every line written to metrics.jsonl (losses, mask updates, evaluation summaries)
    on_evaluation(trainer, report)  a periodic evaluation's whole report (hf.evaluate's dict, "mean_success" ...)
    on_mask_update(trainer, info)   a harmony mask update's summary (flips, density ...)
    on_checkpoint(trainer, path)    checkpoint.pt was just written at trainer.step (path: checkpoint.pt)
Returning True (or calling trainer.request_stop(reason)) stops training after the current step: the trainer writes
a checkpoint and returns a TrainResult with stopped_early=True and stop_reason. The request reaches every
data-parallel rank at the trainer's next stop check (every step with one process, every few steps with several).

RunCheckpoints keeps what a run folder holds beside the resumable checkpoint.pt: the last `keep_checkpoints`
step exports (checkpoints/step_<N>/) and best/, the export of the best evaluation so far with its report
(best/evaluation.json). Both are exports (checkpoint.export: config.json + safetensors, no pickle), which
hf.load_policy and hf.evaluate read, each written to a temporary folder and renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil

from harmodt_fast._io import atomic_write, atomic_write_folder, restore_temporary_folders
from harmodt_fast.checkpoint import RunState, export

CALLBACK_EVENTS = ("on_log", "on_evaluation", "on_mask_update", "on_checkpoint")
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
BEST_REPORT = "evaluation.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class Callback:
    """An optional base class: every event a no-op (subclass and override those you need)."""

    def on_log(self, trainer, entry: dict):
        return None

    def on_evaluation(self, trainer, report: dict):
        return None

    def on_mask_update(self, trainer, info: dict):
        return None

    def on_checkpoint(self, trainer, path: str):
        return None


class StopAtSuccess(Callback):
    """Stops training once a periodic evaluation's mean success is >= threshold (a fraction, 0..1)."""

    def __init__(self, threshold: float):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be a success rate in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def on_evaluation(self, trainer, report: dict):
        if report["mean_success"] >= self.threshold:
            trainer.request_stop(f"StopAtSuccess: mean success {report['mean_success']:.3f} >= "
                                 f"{self.threshold:.3f} at step {trainer.step}")
        return None


def check_callbacks(callbacks) -> list:
    """The callbacks as a list; a TypeError for an object that has none of the events."""
    callbacks = list(callbacks or ())
    for cb in callbacks:
        if not any(callable(getattr(cb, e, None)) for e in CALLBACK_EVENTS):
            raise TypeError(f"a callback needs at least one of {', '.join(CALLBACK_EVENTS)}; "
                            f"{type(cb).__name__} has none")
    return callbacks


def dispatch(callbacks: list, event: str, trainer, arg) -> None:
    """Calls `event` on every callback that has it, in order (on rank 0 only); one returning True requests the
    stop (trainer.request_stop: every rank stops at the next stop check)."""
    if not trainer.dist.main:
        return
    for cb in callbacks:
        method = getattr(cb, event, None)
        if method is not None and method(trainer, arg) is True:
            trainer.request_stop(f"{type(cb).__name__}.{event} returned True at step {trainer.step}")


class RunCheckpoints:
    """The run folder's kept exports (rank 0 writes them; the folder is locked by the trainer)."""

    def __init__(self, out: str, keep: int, resumed_step: int | None):
        self.out, self.keep = out, keep
        self.best_dir = os.path.join(out, BEST_DIR)
        self._exported_step: int | None = None
        for folder in (out, os.path.join(out, CHECKPOINTS_DIR)):
            restore_temporary_folders(folder)
        # the best so far: best/'s, when it belongs to the run resumed (written at or before its step)
        self.best_success: float | None = None
        best = read_best(out)
        if resumed_step is not None and best is not None and best["step"] <= resumed_step:
            self.best_success = float(best["mean_success"])

    def step_dirs(self) -> list[tuple[int, str]]:
        """(step, path) of checkpoints/step_<N>/, by step."""
        folder = os.path.join(self.out, CHECKPOINTS_DIR)
        if not os.path.isdir(folder):
            return []
        found = [(int(m.group(1)), e.path) for e in os.scandir(folder) if (m := _STEP_DIR.match(e.name))]
        return sorted(found)

    def on_save(self, state: RunState) -> str | None:
        """Exports the checkpoint just written as checkpoints/step_<N>/ and removes all but the last `keep` (never
        checkpoint.pt); returns the export's path (None when keep is 0)."""
        if not self.keep:
            return None
        path = os.path.join(self.out, CHECKPOINTS_DIR, f"step_{state.step}")
        if self._exported_step != state.step or not os.path.isdir(path):
            atomic_write_folder(path, lambda tmp: export(state, tmp))
            self._exported_step = state.step
        for _, old in self.step_dirs()[:-self.keep]:
            shutil.rmtree(old)
        return path

    def on_evaluation(self, state: RunState, report: dict) -> bool:
        """Writes best/ (the export of `state` and its report) when the report's mean success beats the best so
        far (ties keep the earlier); returns whether it did."""
        success = float(report["mean_success"])
        if self.best_success is not None and success <= self.best_success:
            return False

        def write(tmp):
            export(state, tmp)
            atomic_write(os.path.join(tmp, BEST_REPORT), lambda f: json.dump(report, f, indent=1), binary=False)

        atomic_write_folder(self.best_dir, write)
        self.best_success = success
        return True


def read_best(out: str) -> dict | None:
    """best/'s evaluation report in the run folder `out` (None when there is none)."""
    path = os.path.join(out, BEST_DIR, BEST_REPORT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
