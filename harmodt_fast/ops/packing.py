"""Bit-packed task masks: bool [T, P] <-> int32 [T, ceil(P/32)].

Bit j of word w holds element 32*w + j. One bit per weight per task: the paper model on MT50 needs 29.6 MB
where float32 masks take 946 MB.
"""
from __future__ import annotations

import torch

from harmodt_fast.ops._dispatch import register, select

WORD_BITS = 32


def words_for(num_elements: int) -> int:
    return (num_elements + WORD_BITS - 1) // WORD_BITS


# bits set in each byte value, for popcounts over packed words
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount_rows(packed: torch.Tensor) -> torch.Tensor:
    """Set bits per row of an int32 [T, W] tensor -> int64 [T] (on packed's device)."""
    as_bytes = packed.contiguous().view(torch.uint8).long()
    return _POPCOUNT8.to(packed.device)[as_bytes].sum(dim=1)


def _check_dense(dense: torch.Tensor) -> None:
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or dense.dtype != torch.bool:
        got = f"{tuple(dense.shape)} {dense.dtype}" if isinstance(dense, torch.Tensor) else type(dense).__name__
        raise ValueError(f"pack_masks expects a bool tensor [T, P], got {got}")


def _check_packed(packed: torch.Tensor, num_elements: int) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2 or packed.dtype != torch.int32:
        got = f"{tuple(packed.shape)} {packed.dtype}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"unpack_masks expects an int32 tensor [T, W], got {got}")
    if num_elements < 0 or packed.shape[1] != words_for(num_elements):
        raise ValueError(
            f"unpack_masks: packed masks {tuple(packed.shape)} hold {packed.shape[1]} words per task, "
            f"but P={num_elements} needs {words_for(num_elements)}"
        )


def pack_masks_torch(dense: torch.Tensor) -> torch.Tensor:
    T, P = dense.shape
    W = words_for(P)
    padded = torch.zeros(T, W * WORD_BITS, dtype=torch.int64, device=dense.device)
    padded[:, :P] = dense
    shifts = torch.arange(WORD_BITS, device=dense.device, dtype=torch.int64)
    words = (padded.view(T, W, WORD_BITS) << shifts).sum(-1)  # in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32's range
    return words.to(torch.int32)


def unpack_masks_torch(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    T, W = packed.shape
    shifts = torch.arange(WORD_BITS, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(T, W * WORD_BITS)[:, :num_elements].bool()


def pack_masks_cpp(dense: torch.Tensor) -> torch.Tensor:
    from harmodt_fast._ext import load_extension

    return load_extension().pack_masks(dense)


def unpack_masks_cpp(packed: torch.Tensor, num_elements: int) -> torch.Tensor:
    from harmodt_fast._ext import load_extension

    return load_extension().unpack_masks(packed, num_elements)


register("pack_masks", "torch", "harmodt_fast.ops.packing:pack_masks_torch")
register("pack_masks", "cpp", "harmodt_fast.ops.packing:pack_masks_cpp")
register("unpack_masks", "torch", "harmodt_fast.ops.packing:unpack_masks_torch")
register("unpack_masks", "cpp", "harmodt_fast.ops.packing:unpack_masks_cpp")


def pack_masks(dense: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """bool [T, P] -> int32 [T, ceil(P/32)] (bit j of word w = element 32w + j)."""
    _check_dense(dense)
    _, fn = select("pack_masks", backend, dense.device)
    return fn(dense)


def unpack_masks(packed: torch.Tensor, num_elements: int, backend: str = "auto") -> torch.Tensor:
    """int32 [T, W] -> bool [T, P], the inverse of `pack_masks`."""
    _check_packed(packed, int(num_elements))
    _, fn = select("unpack_masks", backend, packed.device)
    return fn(packed, int(num_elements))
