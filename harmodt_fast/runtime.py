"""Where and how things run: the device, the autocast precision, progress bars. The bottom of the package: it
imports nothing of ours, so every module can use it."""
from __future__ import annotations

import numbers

import torch


def integer_in(name: str, value, lo: int, hi: int | None = None) -> int:
    """`value` as an int when it is an integer (not a bool, not a float) in lo..hi; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (
            hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer in {lo}..{'' if hi is None else hi}, got {value!r}")
    return int(value)


def pick_device(device="auto") -> torch.device:
    """"auto": CUDA when there is one, else the CPU; an unknown device, or CUDA without one, is a ValueError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:  # torch names the device types it knows
        raise ValueError(f"device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return dev


def same_device(a, b) -> bool:
    """Whether two device specs name one device: "cuda" and "cuda:0" do (an index-less spec means the current
    device of its type), and so do "cpu" and "cpu:0"."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = 0
        if a.type != "cpu" and hasattr(torch, a.type):
            current = getattr(torch, a.type).current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index


def autocast_dtype(config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16) unless fp32 is asked for; the same
    rule for training and evaluation, so a run acts as it trained."""
    if config.precision == "fp32":
        return None
    if config.precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    native = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or getattr(
        torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native else None


class _NoBar:
    def update(self, n=1): ...
    def set_postfix(self, **kw): ...
    def close(self): ...


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
    """A tqdm bar, or a silent stand-in with the same methods when disabled (or tqdm is missing)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return _NoBar()
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return _NoBar()
