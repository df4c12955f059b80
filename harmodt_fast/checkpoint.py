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
and the trainer adds what resuming needs ("optimizer", "scheduler", "sampler", "rng", "history").
"""
from __future__ import annotations

import os
from dataclasses import fields

import torch

from harmodt_fast._io import atomic_write
from harmodt_fast.batch import Prompt

CHECKPOINT_FORMAT = "harmodt_fast/1"
CHECKPOINT_NAME = "checkpoint.pt"


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
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
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
