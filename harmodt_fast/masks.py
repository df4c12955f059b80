"""TaskMasks: one binary mask per task over named weights, stored bit-packed (1 bit per weight per task).

A TaskMasks is a value: {name: int32 [T, ceil(numel/32)]} plus each name's shape. The model keeps its own copy
in the `masks_packed` buffers of its MaskedLinear layers (so it moves with .to() and lands in the state dict);
`HarmoDT.task_masks()` / `HarmoDT.set_masks()` convert between the two.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import numpy as np
import torch

from harmodt_fast.ops.packing import pack_masks, popcount_rows, unpack_masks, words_for


OVERLAP_PIECE_BITS = 1 << 24  # TaskMasks.overlap unpacks at most this many mask bits (all tasks) at once


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel density per layer: density_l ∝ (Σ dims)/(Π dims), scaled so that the overall density
    is `density`; 1-D parameters, and layers whose density would exceed 1, stay dense."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(numel.values())
    dense = {n for n, s in shapes.items() if len(s) < 2 or density == 1.0}
    while True:
        budget = density * total - sum(numel[n] for n in dense)
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items() if n not in dense}
        if not raw:
            break
        eps = budget / sum(raw[n] * numel[n] for n in raw)
        worst = max(raw.values())
        if eps * worst <= 1.0:
            break
        dense |= {n for n, r in raw.items() if r == worst}
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def random_subset(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """bool [n] with exactly k True, a uniformly random k-subset: the k smallest of n random 32-bit keys (ties by
    index). Only the few keys near the k/n quantile are sorted: a pass over n random numbers instead of a
    permutation of n (about 10x faster than torch.randperm at 4M weights on one core: bench_ops, mask_init)."""
    if k <= 0 or k >= n:
        return np.full(n, k > 0)
    keys = rng.integers(0, 2**32, n, dtype=np.uint32)
    middle, spread = k / n * 2**32, 8 * (math.sqrt(n * (k / n) * (1 - k / n)) + 1) / n * 2**32
    for widen in (1, 16):  # the key band holding the k-th key: 8 then 128 standard deviations around its mean
        lo, hi = max(0, int(middle - widen * spread)), min(2**32 - 1, int(middle + widen * spread) + 1)
        chosen = keys < np.uint32(lo)
        below = int(chosen.sum())
        band = np.flatnonzero((keys >= np.uint32(lo)) & (keys < np.uint32(hi)))
        if below <= k <= below + band.size:
            break
    else:  # never seen: fall back to ordering every key
        chosen, below, band = np.zeros(n, bool), 0, np.arange(n)
    chosen[band[np.lexsort((band, keys[band]))[: k - below]]] = True
    return chosen


class TaskMasks:
    def __init__(self, shapes: Mapping[str, tuple[int, ...]], packed: Mapping[str, torch.Tensor]):
        if set(shapes) != set(packed):
            raise ValueError(f"TaskMasks: names of shapes {sorted(shapes)} and packed {sorted(packed)} differ")
        num_tasks = {p.shape[0] for p in packed.values()}
        if len(num_tasks) != 1:
            raise ValueError(f"TaskMasks: layers disagree on the number of tasks: {num_tasks}")
        for name, shape in shapes.items():
            p = packed[name]
            if p.dtype != torch.int32 or p.dim() != 2 or p.shape[1] != words_for(math.prod(shape)):
                raise ValueError(
                    f"TaskMasks: {name}: packed mask {tuple(p.shape)} {p.dtype} does not fit shape {tuple(shape)}"
                )
        self.shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self._packed = dict(packed)
        self.num_tasks = num_tasks.pop()

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def erk(cls, model_or_shapes, num_tasks: int, density: float = 0.8, seed: int = 0, device=None) -> "TaskMasks":
        """Independent random masks per task with ERK layer densities; every task gets exactly
        round(density_l * numel_l) active weights in layer l, a uniformly random subset drawn from its own
        random stream (seed, layer, task), so tasks are drawn in parallel threads and the masks do not depend on
        how many."""
        shapes = masked_weight_shapes(model_or_shapes)
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        densities = erk_densities(shapes, density)
        packed = {}
        with ThreadPoolExecutor(max(1, min(num_tasks, os.cpu_count() or 1))) as pool:
            for layer, (name, shape) in enumerate(shapes.items()):
                n = math.prod(shape)
                active = int(round(densities[name] * n))
                rows = pool.map(lambda t: random_subset(np.random.default_rng([int(seed), layer, t]), n, active),
                                range(num_tasks))
                dense = torch.from_numpy(np.stack(list(rows)))  # [T, n] bool
                packed[name] = pack_masks(dense).to(device) if device is not None else pack_masks(dense)
        return cls(shapes, packed)

    @classmethod
    def from_dense(cls, dense: Mapping[str, torch.Tensor]) -> "TaskMasks":
        """{name: bool [T, *shape]} -> TaskMasks."""
        shapes, packed = {}, {}
        for name, m in dense.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() < 2:
                raise ValueError(f"TaskMasks.from_dense: {name} must be a bool tensor [T, *shape], got "
                                 f"{getattr(m, 'shape', m)} {getattr(m, 'dtype', '')}")
            shapes[name] = tuple(m.shape[1:])
            packed[name] = pack_masks(m.reshape(m.shape[0], -1))
        return cls(shapes, packed)

    # access ---------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def packed(self, name: str) -> torch.Tensor:
        """int32 [T, ceil(numel/32)]: what the ops take."""
        if name not in self._packed:
            raise KeyError(f"no mask named {name!r}; names: {self.names}")
        return self._packed[name]

    def to_dense(self, name: str, task: int | None = None) -> torch.Tensor:
        """bool [*shape] for one task, or [T, *shape] for all."""
        packed = self.packed(name)
        shape = self.shapes[name]
        if task is None:
            return unpack_masks(packed, math.prod(shape)).view(self.num_tasks, *shape)
        self._check_task(task)
        return unpack_masks(packed[task : task + 1], math.prod(shape)).view(*shape)

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} tasks")

    def active_counts(self, name: str | None = None) -> torch.Tensor:
        """Active weights per task, int64 [T] (over all names, or one)."""
        names = [name] if name is not None else self.names
        return sum(popcount_rows(self.packed(n)).cpu() for n in names)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def density(self, task: int | None = None) -> float:
        counts = self.active_counts()
        if task is None:
            return counts.sum().item() / (self.numel * self.num_tasks)
        self._check_task(task)
        return counts[task].item() / self.numel

    def layer_density(self, task: int | None = None) -> dict[str, float]:
        out = {}
        for n, s in self.shapes.items():
            c = self.active_counts(n)
            out[n] = (c.sum().item() / self.num_tasks if task is None else c[task].item()) / math.prod(s)
        return out

    def overlap(self) -> torch.Tensor:
        """T x T Jaccard similarity |M_i ∧ M_j| / |M_i ∨ M_j| over all masked weights (float64, on the CPU). Counted on
        the masks' device (a matmul of the unpacked bits per piece); only the [T, T] result comes to the host."""
        T = self.num_tasks
        inter = torch.zeros(T, T, dtype=torch.float64, device=next(iter(self._packed.values())).device)
        # pieces of OVERLAP_PIECE_BITS unpacked bits: float32 counts of a piece stay exact (<= 2**24)
        words = max(1, OVERLAP_PIECE_BITS // (32 * T))
        for name in self.names:
            packed, n = self.packed(name), math.prod(self.shapes[name])
            for w0 in range(0, packed.shape[1], words):
                w1 = min(packed.shape[1], w0 + words)
                d = unpack_masks(packed[:, w0:w1].contiguous(), min(n, 32 * w1) - 32 * w0).float()
                inter += (d @ d.t()).double()
        inter = inter.cpu()
        sizes = inter.diagonal().clone()
        union = sizes[:, None] + sizes[None, :] - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._packed.values())

    # flat view for the harmony update ------------------------------------------------------------------------
    def flat_packed(self) -> torch.Tensor:
        """All names concatenated in order into one packed [T, ceil(numel/32)] tensor."""
        if all(math.prod(s) % 32 == 0 for s in self.shapes.values()):
            return torch.cat([self._packed[n] for n in self.names], dim=1)
        dense = torch.cat([self.to_dense(n).reshape(self.num_tasks, -1) for n in self.names], dim=1)
        return pack_masks(dense)

    def with_flat_packed(self, flat: torch.Tensor) -> "TaskMasks":
        """The inverse of flat_packed: a new TaskMasks from one concatenated packed tensor."""
        if flat.shape != (self.num_tasks, words_for(self.numel)) or flat.dtype != torch.int32:
            raise ValueError(f"flat masks must be int32 [{self.num_tasks}, {words_for(self.numel)}], got "
                             f"{tuple(flat.shape)} {flat.dtype}")
        sizes = [math.prod(self.shapes[n]) for n in self.names]
        if all(s % 32 == 0 for s in sizes):
            parts = torch.split(flat, [s // 32 for s in sizes], dim=1)
            return TaskMasks(self.shapes, {n: p.contiguous() for n, p in zip(self.names, parts)})
        dense = unpack_masks(flat, self.numel)
        parts = torch.split(dense, sizes, dim=1)
        return TaskMasks(self.shapes, {n: pack_masks(p.contiguous()) for n, p in zip(self.names, parts)})

    def consensus(self, threshold: int) -> "TaskMasks":
        """One mask (T=1) keeping a weight when at least `threshold` tasks keep it (for unseen tasks)."""
        if not 1 <= threshold <= self.num_tasks:
            raise ValueError(f"merge threshold must be in 1..{self.num_tasks}, got {threshold}")
        return TaskMasks.from_dense({n: (self.to_dense(n).sum(0) >= threshold)[None] for n in self.names})

    def to(self, device) -> "TaskMasks":
        return TaskMasks(self.shapes, {n: p.to(device) for n, p in self._packed.items()})

    # persistence -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"shapes": dict(self.shapes), "packed": {n: p.cpu() for n, p in self._packed.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TaskMasks":
        return cls(state["shapes"], state["packed"])

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, TaskMasks)
            and self.shapes == other.shapes
            and all(torch.equal(self._packed[n].cpu(), other._packed[n].cpu()) for n in self.names)
        )

    def __repr__(self) -> str:
        return (f"TaskMasks({len(self.shapes)} weights, {self.numel} entries, {self.num_tasks} tasks, "
                f"density {self.density():.4f}, {self.nbytes / 1e6:.2f} MB)")


def masked_weight_shapes(model_or_shapes) -> dict[str, tuple[int, ...]]:
    """{name: shape} of what gets masked: a model's MaskedLinear weights, or a given mapping."""
    if isinstance(model_or_shapes, torch.nn.Module):
        # a model names its masked weights itself (HarmoDT.masked_layers): masks never import the model
        layers = getattr(model_or_shapes, "masked_layers", None)
        shapes = {n: tuple(layer.weight.shape) for n, layer in layers().items()} if callable(layers) else {}
        if not shapes:
            raise ValueError(f"{type(model_or_shapes).__name__} has no masked layers (masked_layers()) to mask")
        return shapes
    return {str(n): tuple(int(d) for d in s) for n, s in dict(model_or_shapes).items()}
