"""Experiment loggers that mirror metrics.jsonl: every number of a log entry becomes one scalar at the entry's step.

config.logger names them: "tensorboard" (events under <run>/tensorboard; `pip install tensorboard`), "wandb"
(Weights & Biases, files under <run>/wandb unless WANDB_DIR says where; `pip install 'harmodt_fast[wandb]'`;
WANDB_MODE=offline keeps the run on disk, WANDB_PROJECT picks the project, default "harmodt_fast"; a user's
WANDB_* variables win over these defaults), a list of both, or None. Nested dicts become 'a/b' tags
("mask_update/flips", "task_loss/reach-v3", "eval/mean_success"); strings and lists are left to the JSON log.

A resumed run continues its tracking: the trainer has cut metrics.jsonl back to the checkpoint's step before the
loggers start, so a log that still holds entries means a resume. TensorBoard then purges its events after the last
kept entry (steps a killed run logged past its checkpoint), and W&B reuses the run id kept in <run>/wandb_run_id.
"""
from __future__ import annotations

import os
import secrets

from harmodt_fast._io import atomic_write, read_json_lines

METRICS_NAME = "metrics.jsonl"  # the run's JSON log, which these loggers mirror
WANDB_ID_NAME = "wandb_run_id"  # the W&B run id of the run folder, written on its first wandb.init


def parse_loggers(value, tensorboard: bool = False) -> tuple[str, ...] | None:
    """config.logger as a tuple of known names (None when empty); `tensorboard` is the older boolean spelling."""
    if value is None:
        names = []
    elif isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    else:
        names = list(value)
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r}; expected one of {tuple(LOGGERS)}, a list of them, or None")
    if tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return tuple(dict.fromkeys(names)) or None


def scalars(entry: dict, prefix: str = ""):
    """(tag, number) pairs of a log entry, nested dicts flattened into 'a/b' tags; the step itself is skipped."""
    for key, value in entry.items():
        if key == "step" and not prefix:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


def last_logged_step(out: str) -> int | None:
    """The step of the last entry of <out>/metrics.jsonl (None when it holds none): where a resumed run's log goes
    on from."""
    path = os.path.join(out, METRICS_NAME)
    if not os.path.exists(path):
        return None
    steps = [entry["step"] for _, entry in read_json_lines(path, ValueError) if isinstance(entry.get("step"), int)]
    return max(steps, default=None)


WANDB_ENV = {"project": "WANDB_PROJECT", "name": "WANDB_NAME", "dir": "WANDB_DIR", "id": "WANDB_RUN_ID",
             "resume": "WANDB_RESUME"}  # wandb.init's argument -> the environment variable that sets it


def wandb_run_id(out: str) -> str:
    """The W&B run id of the run folder: the stored one when the run resumes (its log holds entries), else a new
    one, stored atomically before wandb.init so that a run killed at any point resumes into the same W&B run."""
    path = os.path.join(out, WANDB_ID_NAME)
    if last_logged_step(out) is not None and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            stored = f.read().strip()
        if stored:
            return stored
    run_id = secrets.token_hex(8)  # W&B ids: letters, digits, '-' and '_'
    atomic_write(path, lambda f: f.write(run_id + "\n"), binary=False)
    return run_id


class TensorBoardLogger:
    def __init__(self, out: str, config):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ValueError("logger 'tensorboard' needs the tensorboard package: pip install tensorboard") from exc
        folder = os.path.join(out, "tensorboard")
        last = last_logged_step(out)
        # events of steps past the log's end (a run killed after logging them, before its checkpoint) are dropped
        # by TensorBoard on reading: purge_step starts a session that hides the older files' later steps
        earlier = os.path.isdir(folder) and any(name.startswith("events.") for name in os.listdir(folder))
        purge_step = (0 if last is None else last + 1) if earlier else None
        self.writer = SummaryWriter(folder, purge_step=purge_step)

    def log(self, entry: dict) -> None:
        for tag, value in scalars(entry):
            self.writer.add_scalar(tag, value, entry["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, out: str, config):
        try:
            import wandb
        except ImportError as exc:
            raise ValueError("logger 'wandb' needs the wandb package: pip install 'harmodt_fast[wandb]'") from exc
        defaults = {"project": "harmodt_fast", "name": os.path.basename(out), "dir": out}
        if "WANDB_RUN_ID" not in os.environ:  # a user's run id wins, and then the run folder keeps none
            defaults.update(id=wandb_run_id(out), resume="allow")
        # a user's WANDB_* variables win over these defaults (wandb.init's arguments would override them)
        kwargs = {key: value for key, value in defaults.items() if WANDB_ENV[key] not in os.environ}
        self.run = wandb.init(**kwargs, config=config.to_dict(), settings=wandb.Settings(console="off"))

    def log(self, entry: dict) -> None:
        values = dict(scalars(entry))
        if values:
            self.run.log(values, step=int(entry["step"]))

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}  # the one registry: config.logger's names


class Loggers:
    """The loggers of config.logger, as one: .log(entry) and .close()."""

    def __init__(self, names, out: str, config):
        self.loggers = [LOGGERS[name](out, config) for name in parse_loggers(names) or ()]

    def log(self, entry: dict) -> None:
        for logger in self.loggers:
            logger.log(entry)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []
