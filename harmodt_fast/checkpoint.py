"""Checkpoints: written atomically (temporary file in the same folder, fsync, rename), read with checks.

A checkpoint is a dict saved with torch.save. Keys every checkpoint has (the trainer writes them, evaluation
reads them):
    "format":        CHECKPOINT_FORMAT
    "config":        HarmoDTConfig.to_dict()
    "model":         the model's state dict (the packed task masks are buffers in it)
    "step":          optimisation steps done
    "tasks":         task names, in model task-id order
    "state_mean", "state_std":  float32 [T, state_dim] per-task state normalisation
    "eval_prompts":  {field: tensor [T, prompt_len, ...]} one prompt per task (fields of hf.Prompt), or None
    "dataset_fingerprint": str identifying the training data
and the trainer adds what resuming needs ("optimizer", "sampler", "rng", "history"; the learning rate is a
function of the step, so there is no scheduler state).

Reading never runs code: torch.load(weights_only=True) only rebuilds tensors and plain containers, so a file that
needs anything else (a crafted pickle) is refused before any of it executes.

An export (`export(run, folder)`) is the pickle-free form for sharing a trained policy: `config.json` (the config,
task names, step), `model.safetensors` (the state dict, packed masks included) and `tasks.safetensors` (per-task
state normalisation and prompts). `read_run` turns either form into the same checkpoint dict.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import fields

import torch

from harmodt_fast._io import atomic_write, read_json_format
from harmodt_fast.batch import Prompt

CHECKPOINT_FORMAT = "harmodt_fast/1"
CHECKPOINT_NAME = "checkpoint.pt"
EXPORT_FORMAT = "harmodt_fast-export/1"
EXPORT_FILES = ("config.json", "model.safetensors", "tasks.safetensors")
_REQUIRED = ("config", "model", "tasks", "state_mean", "state_std")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the run asking for it."""


def save_atomic(obj, path: str) -> str:
    """torch.save to `path` without ever leaving a partial file there: a killed run keeps the previous one."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Reads a checkpoint file, or the checkpoint inside a run folder; CheckpointError names what is wrong."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a harmodt_fast checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
    return ckpt


def prompt_to_dict(prompt: Prompt | None) -> dict | None:
    return None if prompt is None else {f.name: getattr(prompt, f.name).cpu() for f in fields(Prompt)}


def prompt_from_dict(d: dict | None) -> Prompt | None:
    return None if d is None else Prompt(**d)


def model_from_checkpoint(ckpt: dict, device="cpu"):
    """(model in eval mode, config) from a loaded checkpoint dict."""
    from harmodt_fast.config import HarmoDTConfig
    from harmodt_fast.model import HarmoDT

    config = HarmoDTConfig.from_dict(ckpt["config"])
    model = HarmoDT(config)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


# ---- reading any run form, checked ----------------------------------------------------------------------------------
def read_run(source) -> tuple[dict, str]:
    """(checkpoint dict, a name for messages) from a checkpoint file, a run folder, an export folder, an object with
    a `.checkpoint` path (hf.train's result) or a loaded dict; checks that its parts agree with each other."""
    if isinstance(source, dict):
        ckpt, name = source, "checkpoint dict"
    else:
        path = getattr(source, "checkpoint", source)
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"expected a checkpoint path, a run or export folder, a TrainResult or a checkpoint "
                             f"dict, got {type(source).__name__}")
        name = os.fspath(path)
        is_export = os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")) and not \
            os.path.isfile(os.path.join(name, CHECKPOINT_NAME))
        ckpt = read_export(name) if is_export else load_checkpoint(name)
    check_consistent(ckpt, name)
    return ckpt, name


def check_consistent(ckpt: dict, name: str) -> None:
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{name}: checkpoint lacks {missing}")
    tasks, cfg = list(ckpt["tasks"]), ckpt["config"]
    T, S = len(tasks), cfg.get("state_dim")
    problems = []
    if cfg.get("num_tasks") != T:
        problems.append(f"config.num_tasks is {cfg.get('num_tasks')} but the task list has {T} names")
    if cfg.get("tasks") is not None and list(cfg["tasks"]) != tasks:
        problems.append(f"config.tasks {list(cfg['tasks'])} differs from the task list {tasks}")
    for key in ("state_mean", "state_std"):
        if tuple(ckpt[key].shape) != (T, S):
            problems.append(f"{key} has shape {tuple(ckpt[key].shape)}, expected ({T}, {S})")
    prompts = ckpt.get("eval_prompts")
    if prompts is not None:
        for f in (f.name for f in fields(Prompt)):
            if f not in prompts or prompts[f].shape[0] != T:
                shape = tuple(prompts[f].shape) if f in prompts else "missing"
                problems.append(f"eval_prompts[{f!r}] is {shape}, expected one row per task ({T})")
    if problems:
        raise CheckpointError(f"{name}: inconsistent checkpoint: " + "; ".join(problems))


# ---- export: config.json + safetensors, no pickle -------------------------------------------------------------------
def export(run, folder) -> str:
    """Writes the policy of a run (checkpoint file, run folder, TrainResult or dict) to `folder` as config.json,
    model.safetensors (weights and packed masks) and tasks.safetensors (per-task normalisation and prompts);
    `hf.load_policy(folder)` and `hf.evaluate(folder)` read it without unpickling anything. Returns the folder."""
    from safetensors.torch import save

    ckpt, _ = read_run(run)
    folder = os.path.abspath(os.fspath(folder))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    per_task = {"state_mean": ckpt["state_mean"].float().contiguous(), "state_std": ckpt["state_std"].float().contiguous()}
    for f, v in (ckpt.get("eval_prompts") or {}).items():
        per_task[f"prompt.{f}"] = v.cpu().contiguous()
    meta = {"format": EXPORT_FORMAT, "config": ckpt["config"], "tasks": list(ckpt["tasks"]),
            "step": int(ckpt.get("step", 0)), "dataset_fingerprint": ckpt.get("dataset_fingerprint"),
            "task_envs": ckpt.get("task_envs") or {}}
    atomic_write(os.path.join(folder, "model.safetensors"), lambda f: f.write(save(tensors)))
    atomic_write(os.path.join(folder, "tasks.safetensors"), lambda f: f.write(save(per_task)))
    # config.json last: a folder with it is complete
    atomic_write(os.path.join(folder, "config.json"), lambda f: json.dump(meta, f, indent=1), binary=False)
    return folder


def read_export(folder: str) -> dict:
    """An export folder as a checkpoint dict (what load_checkpoint returns, minus the resume state)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    paths = {name: os.path.join(folder, name) for name in EXPORT_FILES}
    for path in paths.values():
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (an export folder holds {', '.join(EXPORT_FILES)})")
    meta = read_json_format(paths["config.json"], EXPORT_FORMAT, "harmodt_fast export", CheckpointError)
    loaded = {}
    for name in ("model.safetensors", "tasks.safetensors"):
        try:
            loaded[name] = load_file(paths[name])
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{paths[name]}: cannot be read as safetensors ({exc})") from exc
    per_task = loaded["tasks.safetensors"]
    for key in ("state_mean", "state_std"):
        if key not in per_task:
            raise CheckpointError(f"{paths['tasks.safetensors']}: no {key!r} tensor")
    prompts = {k.removeprefix("prompt."): v for k, v in per_task.items() if k.startswith("prompt.")}
    return {"format": CHECKPOINT_FORMAT, "config": meta["config"], "model": loaded["model.safetensors"],
            "step": int(meta.get("step", 0)), "tasks": list(meta["tasks"]), "state_mean": per_task["state_mean"],
            "state_std": per_task["state_std"], "eval_prompts": prompts or None,
            "dataset_fingerprint": meta.get("dataset_fingerprint"), "task_envs": meta.get("task_envs") or {}}
