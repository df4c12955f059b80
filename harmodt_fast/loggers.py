"""Experiment loggers that mirror metrics.jsonl: every number of a log entry becomes one scalar at the entry's step.

config.logger names them: "tensorboard" (events under <run>/tensorboard; `pip install tensorboard`), "wandb"
(Weights & Biases, files under <run>/wandb; `pip install 'harmodt_fast[wandb]'`; WANDB_MODE=offline keeps the run
on disk, WANDB_PROJECT picks the project, default "harmodt_fast"), a list of both, or None. Nested dicts become
'a/b' tags ("mask_update/flips", "task_loss/reach-v3", "eval/mean_success"); strings and lists are left to the
JSON log.
"""
from __future__ import annotations

import os


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


class TensorBoardLogger:
    def __init__(self, out: str, config):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ValueError("logger 'tensorboard' needs the tensorboard package: pip install tensorboard") from exc
        self.writer = SummaryWriter(os.path.join(out, "tensorboard"))

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
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "harmodt_fast"),
                              name=os.path.basename(out), dir=out, config=config.to_dict(),
                              settings=wandb.Settings(console="off"))

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
