"""Data-parallel processes under torchrun: this process's rank, torch's DistributedDataParallel around the training
step, and the few collectives the trainer and the mask update need (gloo on CPU, nccl on CUDA). Without
WORLD_SIZE > 1 every collective is a no-op (or the identity) on one process. docs/distributed.md has the whole story.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from harmodt_fast.batch import rows_per_slice


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- reductions ---------------------------------------------------------------------------------------------
    def average(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor becomes its mean over the ranks (one all-reduce of a flat float32 buffer)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        _copy_back(flat, tensors)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor becomes its sum over the ranks, in its own dtype (one all-reduce per dtype)."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            if len(group) == 1 and group[0].is_contiguous():
                dist.all_reduce(group[0])  # straight into the tensor, no copy
                continue
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            _copy_back(flat, group)

    def shard_range(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n entries: shards of ceil(n / world) entries in rank order (the
        last ones may be shorter or empty)."""
        size = math.ceil(n / self.world) if n > 0 else 0
        lo = min(n, self.rank * size)
        return lo, min(n, lo + size)

    def reduce_scatter_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, n], the same shape on every rank -> this rank's shard [R, hi - lo] (shard_range(n)) of the mean of
        x over the ranks. Memory: x, one padded copy of it laid out shard by shard, and the [R, ceil(n/world)]
        result. On one process: x itself."""
        if x.dim() != 2:
            raise ValueError(f"reduce_scatter_mean expects a [rows, n] tensor, got shape {tuple(x.shape)}")
        if self.world == 1:
            return x
        import torch.distributed as dist

        rows, n = x.shape
        size = math.ceil(n / self.world)
        chunks = x.new_zeros((self.world, rows, size))  # chunk w = columns of rank w's shard, zero padded
        for w in range(self.world):
            lo, hi = Distributed(w, self.world).shard_range(n)
            chunks[w, :, : hi - lo] = x[:, lo:hi]
        out = x.new_empty((rows, size))
        _reduce_scatter_single(dist)(out, chunks.view(self.world * rows, size))  # SUM: gloo has no AVG
        del chunks
        out /= self.world
        lo, hi = self.shard_range(n)
        return out[:, : hi - lo]

    def all_gather_tensor(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (the same shape and dtype on every rank), in rank order."""
        if self.world == 1:
            return [x]
        import torch.distributed as dist

        out = x.new_empty((self.world * x.numel(),))  # the ranks' tensors one after the other (what gloo takes)
        _all_gather_single(dist)(out, x.contiguous().reshape(-1))
        return list(out.view(self.world, *x.shape).unbind(0))

    def any(self, local: bool, device: torch.device) -> bool:
        """True on every rank when it is true on one (so that a signal stops every rank at the same step)."""
        if self.world == 1:
            return local
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (picklable objects)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---- verification -------------------------------------------------------------------------------------------
    def check_same(self, name: str, data: bytes | torch.Tensor | Mapping[str, bytes | torch.Tensor],
                   step: int) -> None:
        """Raises RuntimeError unless every rank holds the same `data` (sha256 per rank, gathered; for a mapping one
        hash per entry, and the message names the entries that differ). A no-op on one process."""
        if self.world == 1:
            return
        entries = data if isinstance(data, Mapping) else {name: data}
        mine = {key: _sha256(value) for key, value in entries.items()}
        every = self.gather(mine)
        differing = [r for r in range(self.world) if every[r] != every[0]]
        if differing:
            keys = sorted({k for r in differing for k in set(every[r]) | set(every[0])
                           if every[r].get(k) != every[0].get(k)})
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            raise RuntimeError(f"data-parallel ranks disagree on {name} at step {step}: rank(s) {differing} differ "
                               f"from rank 0 in {shown} (sha256 of each)")

    # ---- the training step --------------------------------------------------------------------------------------
    def rank_seed(self, seed: int) -> int:
        """The torch seed of this rank's dropout stream, when it starts one (a fresh run, or a rank the checkpoint
        it resumes from did not have)."""
        return seed + 7919 * self.rank

    def check_sampler(self, sampler, batch_per_task: int) -> None:
        """ValueErrors before any work unless `sampler` gives this rank's slice of the global batch (with several
        processes: MultiTaskSampler(..., rank=, world=)) and the slices can be equal."""
        rows_per_slice(batch_per_task, self.world)
        has = (getattr(sampler, "rank", 0), getattr(sampler, "world", 1))
        if has != (self.rank, self.world):
            raise ValueError(f"rank {self.rank} of {self.world} data-parallel processes needs a sampler that draws "
                             f"the global batch and gives this rank's slice (MultiTaskSampler(..., rank={self.rank}, "
                             f"world={self.world})); got {type(sampler).__name__} for rank {has[0]} of {has[1]}")

    def data_parallel(self, model: torch.nn.Module, losses_fn: Callable, device: torch.device) -> torch.nn.Module:
        """torch's DistributedDataParallel around `losses_fn(batch)` (the per-task losses of `model`): its backward
        averages the gradients over the ranks in buckets, overlapped with the backward itself. The loss must reach
        every parameter of `model` (DDP would wait for the others' gradients forever). Calling `model` (or
        losses_fn) directly, outside this wrapper, leaves DDP out: its hooks only act after a forward through the
        wrapper."""
        from torch.nn.parallel import DistributedDataParallel

        wrapper = _LossModule(model, losses_fn)
        # no buffer sync before each forward: the only buffers are the task masks, which change only in the mask
        # update (identically on every rank, verified by hash), so a broadcast per step would buy nothing
        # (torch 2.13 renamed broadcast_buffers)
        names = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers": False}
        return DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None,
                                       **no_sync)


class _LossModule(torch.nn.Module):
    """forward(batch) = the per-task losses of the wrapped model (possibly through a torch.compile'd function)."""

    def __init__(self, model: torch.nn.Module, losses_fn: Callable):
        super().__init__()
        self.model = model
        self._losses_fn = losses_fn

    def forward(self, batch):
        return self._losses_fn(batch)


def _all_gather_single(dist):
    # torch 2.13 renamed all_gather_into_tensor (still there, deprecated)
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_single(dist):
    # torch 2.13 renamed reduce_scatter_tensor (still there, deprecated)
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _copy_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _sha256(value: bytes | torch.Tensor) -> str:
    if isinstance(value, torch.Tensor):
        # dtype and shape in the hash too: the same bytes under another shape are other data
        flat = value.detach().cpu().contiguous().reshape(-1)
        header = f"{flat.dtype}{tuple(value.shape)}".encode()
        digest = hashlib.sha256(header)
        digest.update(flat.view(torch.uint8).numpy())  # the buffer itself, no bytes copy
        return digest.hexdigest()
    return hashlib.sha256(bytes(value)).hexdigest()


def world_size_from_env() -> int:
    """The number of data-parallel processes torchrun started (1 without torchrun)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Joins the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = world_size_from_env()
    if world == 1:
        return Distributed(), device
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world), device
