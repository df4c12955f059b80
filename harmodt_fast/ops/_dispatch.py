"""Backend selection shared by every op in `harmodt_fast.ops`.

Each op has up to three implementations: "triton" (kernels in harmodt_fast.kernels; CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1), "cpp" (harmodt_fast._C, CPU tensors) and "torch" (the plain-PyTorch reference that
defines the semantics). Implementations are registered as "module:function" strings so that importing
harmodt_fast never imports triton or compiles anything. `last_backend(op)` tells which one ran last, so tests can
catch a silent fallback, and `call_counts()` how often each ran. The backend decision per (op, backend, device
type) is made once and cached.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch

BACKENDS = ("triton", "cpp", "torch")
# the order "auto" tries, per device type
_AUTO_ORDER = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}

_registry: dict[str, dict[str, str]] = {}
_last: dict[str, str] = {}
_calls: dict[tuple[str, str], int] = {}  # (op, backend) -> calls, so a test can tell that EVERY call ran a backend


class BackendUnavailableError(RuntimeError, ValueError):
    """An explicitly asked backend cannot run here (the reason in words). A RuntimeError, as it always was, and a
    ValueError: for a user it is bad input, which the CLI prints as one line."""


def register(op: str, backend: str, target: str) -> None:
    """Declare that `op` has a `backend` implementation at `target` ("package.module:function")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _registry.setdefault(op, {})[backend] = target


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """None when `backend` can run on `device` here, else the reason in words."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device is not None and device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type} tensors"
        from harmodt_fast._ext import extension_error, load_extension

        return None if load_extension() is not None else extension_error()
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device is not None and device.type == "cpu" and not triton_interpret():
            return "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 (set before import) for CPU tensors"
        if device is None and not (torch.cuda.is_available() or triton_interpret()):
            return "the triton backend needs a CUDA device, or TRITON_INTERPRET=1 (set before import) on CPU"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")


def available_backends() -> list[str]:
    """The backends that can run on this machine (for some op and some device)."""
    return [b for b in BACKENDS if backend_unavailable_reason(b) is None]


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _resolve_backend(op: str, backend: str, device_type: str) -> str:
    impls = _registry.get(op, {})
    if backend == "auto":
        for cand in _AUTO_ORDER.get(device_type, ("torch",)):
            if cand in impls and backend_unavailable_reason(cand, torch.device(device_type)) is None:
                return cand
        raise BackendUnavailableError(f"{op}: no implementation runs on {device_type} tensors here")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend not in impls:
        have = ", ".join(sorted(impls)) or "none"
        raise BackendUnavailableError(f"{op}: there is no {backend} implementation (implemented: {have})")
    reason = backend_unavailable_reason(backend, torch.device(device_type))
    if reason is not None:
        raise BackendUnavailableError(f"{op}: the {backend} backend cannot run here: {reason}")
    return backend


# (op, backend, device type) -> (backend, implementation): availability (an import, an extension load) is
# checked once, not on every call of an op inside a training step
_decisions: dict[tuple[str, str, str], tuple[str, Callable]] = {}


def _decide(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    key = (op, backend, device.type)
    hit = _decisions.get(key)
    if hit is None:
        chosen = _resolve_backend(op, backend, device.type)
        hit = _decisions[key] = (chosen, _resolve(_registry[op][chosen]))
    return hit


def select(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Pick the implementation of `op` for tensors on `device`; records the choice for `last_backend` (eager calls
    only: a write traced by torch.compile would be a guard on the record, which the next call fails, recompiling)."""
    hit = _decide(op, backend, device)
    if not torch.compiler.is_compiling():
        _last[op] = hit[0]
        _calls[(op, hit[0])] = _calls.get((op, hit[0]), 0) + 1
    return hit


def runs_fused(op: str, backend: str, device: torch.device) -> bool:
    """Whether a model should call the fused block `op` (e.g. "masked_mlp") with `backend` rather than compose it
    from masked_linear layers: true when `backend` picks a real fused implementation, not the torch reference
    composition (which is the same computation, slower than composing the cpp masked_linear on the CPU)."""
    if backend != "auto" and backend not in _registry.get(op, {}):
        return False  # e.g. "cpp": the block has no cpp implementation, its masked_linear layers do
    return _decide(op, backend, device)[0] != "torch"


def check_backend(backend: str, device: torch.device, ops=("masked_linear", "masked_mlp", "masked_attention")) -> None:
    """Raises the RuntimeError that says why `backend` cannot run the model's masked ops on `device` (ValueError
    for an unknown name); called when a model or run is set up, before any work."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    for op in ops:
        if backend == "auto" or backend in _registry.get(op, {}):
            _decide(op, backend, device)


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent call of `op` (None before the first call)."""
    return _last.get(op)


def call_counts() -> dict[tuple[str, str], int]:
    """Calls so far per (op, backend) (a copy): the difference over a run shows every backend that ran in it.
    Calls from inside a torch.compile'd graph are not counted."""
    return dict(_calls)


def implemented_backends(op: str) -> list[str]:
    return [b for b in BACKENDS if b in _registry.get(op, {})]
