"""The run's state on disk: one owner, RunState (what a checkpoint holds, how it is written, read, checked, migrated
from older formats and matched against a run that wants to resume it).

A checkpoint file is RunState.to_dict() saved with torch.save, written atomically (temporary file in the same
folder, fsync, rename):
    "format":        CHECKPOINT_FORMAT
    "config":        HarmoDTConfig.to_dict()
    "model":         the model's state dict (the packed task masks are buffers in it)
    "step":          optimisation steps done
    "tasks":         task names, in model task-id order
    "state_mean", "state_std":  float32 [T, state_dim] per-task state normalisation
    "eval_prompts":  {field: tensor [T, prompt_len, ...]} one prompt per task (fields of hf.Prompt), or None
    "best_return":   float32 [T] each task's highest episode return in the training data (target_mode data-max)
    "dataset_fingerprint": str identifying the training data
    "task_envs":     {task: gymnasium EnvSpec JSON} for tasks without a Meta-World name
and what resuming needs ("optimizer", "sampler", "rng", "history", "task_agreement", "world_size"; the learning
rate is a function of the step, so there is no scheduler state).

Reading never runs code: torch.load(weights_only=True) only rebuilds tensors and plain containers, so a file that
needs anything else (a crafted pickle) is refused before any of it executes. Older formats are migrated as they are
read (_MIGRATIONS, keyed by the format they upgrade). Every reader checks what it read before building anything
from it (check_consistent; the resume part in check_resumable): a bad file is a CheckpointError naming it.

An export (`export(run, folder)`) is the pickle-free form for sharing a trained policy: `config.json` (the config,
task names, step), `model.safetensors` (the state dict, packed masks included) and `tasks.safetensors` (per-task
state normalisation and prompts). `read_run` turns either form into a RunState (an export's has no resume part).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass, field, fields

import torch

from harmodt_fast._io import atomic_write, read_json_format
from harmodt_fast.batch import Prompt
from harmodt_fast.run_checks import (REQUIRED_FIELDS, CheckpointError, check_consistent, check_field_types,
                                     check_resume_part)

CHECKPOINT_FORMAT = "harmodt_fast/2"
CHECKPOINT_NAME = "checkpoint.pt"
EXPORT_FORMAT = "harmodt_fast-export/2"
EXPORT_FILES = ("config.json", "model.safetensors", "tasks.safetensors")
# each export format holds the model of the checkpoint format of the same number (read_export migrates alike)
_EXPORT_TO_CHECKPOINT_FORMAT = {"harmodt_fast-export/1": "harmodt_fast/1", EXPORT_FORMAT: CHECKPOINT_FORMAT}
# config fields that only change logging, not the training trajectory: a resumed run may change them
# (the backend and compile too: they compute the same step, to rounding)
NON_TRAJECTORY_FIELDS = frozenset({"log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_episodes", "eval_max_steps",
                                   "eval_workers", "logger", "tensorboard", "extra", "backend", "compile"})
# field -> (its former default, its default now): a checkpoint holding the former default resumes under the new one
# (mask_update_memory_mb None, "auto", is the former 256 MB on the CPU; on CUDA it may group the update's tasks
# differently, which changes only which dropout draws the update's rows get)
FORMER_DEFAULTS = {"mask_update_memory_mb": (256.0, None)}
# field -> what a config written before the field existed did (not the default now): read in when it is absent
ABSENT_MEANS = {"prompt_source": "held-out"}


@dataclass
class RunState:
    """What a checkpoint holds (the module docstring lists the fields). The resume part (optimizer ... world_size)
    is None where the source lacks it: an export, or a checkpoint written by hand for evaluation."""

    config: dict  # HarmoDTConfig.to_dict() as written (harmodt_config() builds the config)
    model: dict[str, torch.Tensor]
    tasks: list[str]
    state_mean: torch.Tensor
    state_std: torch.Tensor
    step: int = 0
    eval_prompts: dict[str, torch.Tensor] | None = None
    dataset_fingerprint: str | None = None
    task_envs: dict[str, str] = field(default_factory=dict)
    best_return: torch.Tensor | None = None
    optimizer: dict | None = None
    sampler: dict | None = None
    rng: list[dict] | None = None  # one {"torch", "cuda"} per rank (dropout streams)
    history: list[dict] = field(default_factory=list)
    task_agreement: torch.Tensor | None = None
    world_size: int | None = None

    # ---- the file's dict ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, d: dict, name: str = "checkpoint dict", warn_resume: bool = False) -> "RunState":
        """A checkpoint dict of this or an older format (migrated; a dict without "format" counts as this one).
        warn_resume: warn about what a migration changes for a run that resumes from it (the trainer's rank 0)."""
        fmt = d.get("format", CHECKPOINT_FORMAT)
        while fmt != CHECKPOINT_FORMAT:
            if not isinstance(fmt, str) or fmt not in _MIGRATIONS:
                raise CheckpointError(f"{name}: not a harmodt_fast checkpoint (format {fmt!r})")
            d = _MIGRATIONS[fmt](d, name, warn_resume)
            fmt = d["format"]
        # a state that can be resumed must say where it stopped: without its step it would redo steps silently
        missing = [k for k in REQUIRED_FIELDS + (("step",) if d.get("optimizer") is not None else ())
                   if d.get(k) is None]
        if missing:
            raise CheckpointError(f"{name}: checkpoint lacks {missing}")
        if isinstance(d.get("config"), dict):
            d = {**d, "config": {**ABSENT_MEANS, **d["config"]}}
        state = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        check_field_types(state, name)
        state.tasks, state.task_envs = list(state.tasks), dict(state.task_envs or {})
        return state

    def save(self, path: str) -> str:
        """Writes the checkpoint file atomically (a run killed mid-write keeps the previous one); returns path."""
        return save_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str, map_location="cpu", warn_resume: bool = False) -> "RunState":
        """A checkpoint file, or the checkpoint inside a run folder; CheckpointError names what is wrong."""
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_NAME)
        return cls.from_dict(_read_file(path, map_location), path, warn_resume)

    # ---- reading it -----------------------------------------------------------------------------------------------
    def harmodt_config(self):
        """The HarmoDTConfig of `config`."""
        from harmodt_fast.config import HarmoDTConfig

        return HarmoDTConfig.from_dict(self.config)

    # ---- resuming -------------------------------------------------------------------------------------------------
    def check_resumable(self, config, fingerprint: str, name: str) -> None:
        """Refuses (CheckpointError) to resume this state in a run of `config` on data `fingerprint`: the config may
        differ only in NON_TRAJECTORY_FIELDS (a field the checkpoint lacks, added since, counts as its default)."""
        check_consistent(self, name)  # a broken file is named as broken, whatever else differs
        mine, theirs = config.to_dict(), {**_config_defaults(), **dict(self.config)}
        theirs.update({k: now for k, (former, now) in FORMER_DEFAULTS.items()
                       if theirs.get(k) == former and mine.get(k) == now})
        diff = sorted(k for k in mine if k not in NON_TRAJECTORY_FIELDS and mine[k] != theirs.get(k))
        if diff:
            details = ", ".join(f"{k}: {theirs.get(k)!r} there vs {mine[k]!r} now" for k in diff[:6])
            raise CheckpointError(f"{name} belongs to a run with another config ({details}); "
                                  f"use another output folder (it was not overwritten)")
        if self.dataset_fingerprint != fingerprint:
            raise CheckpointError(f"{name} was trained on other data (fingerprint {self.dataset_fingerprint} vs "
                                  f"{fingerprint}); use another output folder (it was not overwritten)")
        lacking = [k for k in ("optimizer", "sampler", "rng") if getattr(self, k) is None]
        if lacking:
            raise CheckpointError(f"{name} holds no resume state ({', '.join(lacking)} missing: an export or a "
                                  f"policy-only checkpoint); use another output folder (it was not overwritten)")
        check_resume_part(self, name)


def _config_defaults() -> dict:
    from harmodt_fast.config import HarmoDTConfig

    return {f.name: f.default for f in fields(HarmoDTConfig) if f.default is not dataclasses.MISSING}


# ---- older formats ----------------------------------------------------------------------------------------------
_REMOVED_HEADS = ("predict_state.", "predict_return.")


def _from_format_1(d: dict, name: str, warn_resume: bool) -> dict:
    """Format 1 -> 2. The model had two heads the action loss never trained (predict_state, predict_return): their
    weights are dropped. Early format-1 files hold a list of sampler states, one per rank, each rank having drawn
    its own batch_per_task rows per task; batch_per_task is now the global batch, so such a run continues from
    rank 0's sampler with a global batch world_size times smaller."""
    model = {k: v for k, v in d["model"].items() if not str(k).startswith(_REMOVED_HEADS)} if isinstance(
        d.get("model"), dict) else d.get("model")
    sampler = d.get("sampler")
    if isinstance(sampler, list):
        if len(sampler) > 1 and warn_resume:
            warnings.warn(f"{name} was written by {len(sampler)} processes that each drew their own "
                          f"batch_per_task rows per task (an older version); batch_per_task now means the global "
                          f"batch, so this run continues from rank 0's sampler with {len(sampler)}x fewer rows per "
                          f"step than before", stacklevel=4)
        sampler = sampler[0] if sampler else None
    migrated = {**d, "format": "harmodt_fast/2", "sampler": sampler}
    if model is not None:
        migrated["model"] = model
    return migrated


_MIGRATIONS = {"harmodt_fast/1": _from_format_1}  # format -> a function giving the next format's dict


# ---- files ----------------------------------------------------------------------------------------------------------
def save_atomic(obj, path: str) -> str:
    """torch.save to `path` without ever leaving a partial file there: a killed run keeps the previous one."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _read_file(path: str, map_location="cpu") -> dict:
    """The dict of a checkpoint file, read with weights_only (a file that would run code is refused)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the offending global ("Unsupported global: GLOBAL posix.system ..."); keep only that part
        what = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        what = what[what.find("GLOBAL"):].split(" was not")[0].rstrip(".") if what else "an object that is not a tensor"
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain containers "
                              f"({what}), and loading them would run code from the file; nothing was loaded") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, *_MIGRATIONS):
        what = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a harmodt_fast checkpoint (format {what!r})")
    return ckpt


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The dict of a checkpoint file (or a run folder's), in the current format: RunState.load(path).to_dict(),
    for code that inspects or edits the file's dict."""
    return RunState.load(path, map_location).to_dict()


def prompt_to_dict(prompt: Prompt | None) -> dict | None:
    return None if prompt is None else {f.name: getattr(prompt, f.name).cpu() for f in fields(Prompt)}


def prompt_from_dict(d: dict | None) -> Prompt | None:
    return None if d is None else Prompt(**d)


def model_from_checkpoint(run: "RunState | dict", device="cpu"):
    """(model in eval mode, config) from a RunState or a checkpoint dict."""
    from harmodt_fast.model import HarmoDT

    state = run if isinstance(run, RunState) else RunState.from_dict(run)
    check_consistent(state, "run state")  # before building: names, shapes, dtypes, values
    config = state.harmodt_config()
    model = HarmoDT(config)
    model.load_state_dict(state.model)
    return model.to(device).eval(), config


# ---- reading any run form, checked ----------------------------------------------------------------------------------
def read_run(source) -> tuple[RunState, str]:
    """(RunState, a name for messages) from a checkpoint file, a run folder, an export folder, an object with a
    `.checkpoint` path (hf.train's result), a loaded checkpoint dict or a RunState; checks that its parts agree."""
    if isinstance(source, RunState):
        state, name = source, "run state"
    elif isinstance(source, dict):
        state, name = RunState.from_dict(source), "checkpoint dict"
    else:
        path = getattr(source, "checkpoint", source)
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"expected a checkpoint path, a run or export folder, a TrainResult, a checkpoint "
                             f"dict or a RunState, got {type(source).__name__}")
        name = os.fspath(path)
        is_export = os.path.isdir(name) and not os.path.isfile(os.path.join(name, CHECKPOINT_NAME)) and any(
            os.path.isfile(os.path.join(name, f)) for f in EXPORT_FILES)
        state = read_export(name) if is_export else RunState.load(name)
    check_consistent(state, name)
    return state, name


# ---- export: config.json + safetensors, no pickle -------------------------------------------------------------------
def export(run, folder) -> str:
    """Writes the policy of a run (checkpoint file, run folder, TrainResult, dict or RunState), checked first, to
    `folder` as config.json, model.safetensors (weights and packed masks) and tasks.safetensors (per-task
    normalisation and prompts), read by hf.load_policy / hf.evaluate without pickle; returns the folder. config.json
    goes last with the others' sha256 (an old one first removed): readers see a whole export or an error."""
    from safetensors.torch import save

    state, _ = read_run(run)
    folder = os.path.abspath(os.fspath(folder))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.model.items()}
    per_task = {"state_mean": state.state_mean.float().contiguous(), "state_std": state.state_std.float().contiguous()}
    for f, v in (state.eval_prompts or {}).items():
        per_task[f"prompt.{f}"] = v.cpu().contiguous()
    if state.best_return is not None:
        per_task["best_return"] = state.best_return.float().contiguous()
    blobs = {"model.safetensors": save(tensors), "tasks.safetensors": save(per_task)}
    meta = {"format": EXPORT_FORMAT, "config": state.config, "tasks": list(state.tasks), "step": int(state.step),
            "dataset_fingerprint": state.dataset_fingerprint, "task_envs": state.task_envs or {},
            "files": {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}}
    if os.path.exists(config_path := os.path.join(folder, "config.json")):
        os.unlink(config_path)
    for file_name, blob in blobs.items():
        atomic_write(os.path.join(folder, file_name), lambda f, blob=blob: f.write(blob))
    atomic_write(config_path, lambda f: json.dump(meta, f, indent=1), binary=False)
    return folder


def read_export(folder: str) -> RunState:
    """An export folder (this format or an older one, migrated) as a RunState without the resume part; its files
    must be the ones config.json names (sha256), its fields of the right types."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    paths = {name: os.path.join(folder, name) for name in EXPORT_FILES}
    for path in paths.values():
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (an export folder holds {', '.join(EXPORT_FILES)})")
    meta = _read_export_meta(paths["config.json"])
    for key, kind in (("config", dict), ("tasks", list), ("step", int), ("files", dict)):
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise CheckpointError(f"{paths['config.json']}: {key!r} is a {type(meta[key]).__name__}, expected "
                                  f"{kind.__name__}")
    if "config" not in meta or "tasks" not in meta:
        raise CheckpointError(f"{paths['config.json']}: lacks {[k for k in ('config', 'tasks') if k not in meta]}")
    loaded = {}
    for name in ("model.safetensors", "tasks.safetensors"):
        with open(paths[name], "rb") as f:
            data = f.read()
        want = meta.get("files", {}).get(name) if meta["format"] == EXPORT_FORMAT else None
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"{paths[name]}: not the file {paths['config.json']} was written with (sha256 "
                                  f"differs): an interrupted or mixed export; export it again")
        try:
            loaded[name] = load(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{paths[name]}: cannot be read as safetensors ({exc})") from exc
    per_task = loaded["tasks.safetensors"]
    prompts = {k.removeprefix("prompt."): v for k, v in per_task.items() if k.startswith("prompt.")}
    return RunState.from_dict({
        "format": _EXPORT_TO_CHECKPOINT_FORMAT[meta["format"]], "config": meta["config"],
        "model": loaded["model.safetensors"], "step": meta.get("step", 0), "tasks": meta["tasks"],
        "state_mean": per_task.get("state_mean"), "state_std": per_task.get("state_std"),  # missing: from_dict says
        "eval_prompts": prompts or None, "dataset_fingerprint": meta.get("dataset_fingerprint"),
        "task_envs": meta.get("task_envs") or {}, "best_return": per_task.get("best_return")}, folder)


def _read_export_meta(path: str) -> dict:
    """config.json of an export of this format or an older one; the error names this format when neither fits."""
    try:
        return read_json_format(path, EXPORT_FORMAT, "harmodt_fast export", CheckpointError)
    except CheckpointError as current:
        for older in (f for f in _EXPORT_TO_CHECKPOINT_FORMAT if f != EXPORT_FORMAT):
            try:
                return read_json_format(path, older, "harmodt_fast export", CheckpointError)
            except CheckpointError:
                pass
        raise current from None
