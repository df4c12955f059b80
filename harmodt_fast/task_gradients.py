"""Per-task gradients for the harmony mask update, within a memory budget (the machinery under method.mask_update).

Task t's gradient g_t is that of its own loss w.r.t. its effective weights, from its own rows only, over the P
masked entries (the model's flat layout), clipped to norm config.task_grad_clip. `TaskGradientPasses` delivers
them G tasks at a time (G: the float32 rows that fit config.mask_update_memory_mb, or when that is None ("auto") half
the free memory of a CUDA device, 256 MB elsewhere; `update_group_size`):
- the first pass computes the clip factors and sums the harmony gradient ḡ = (1/T) Σ_t g_t (float64, tasks in
  order 0..T-1); when every task fits (G = T) it keeps the rows, and that is the only pass (the selection engine
  then sums ḡ from the kept rows itself, in cache, with the same arithmetic);
- otherwise a second pass recomputes each group's rows (same dropout: the RNG is replayed) for the selection.
Without dropout the masks do not depend on G; with it, each group's forward draws its own dropout (the same in
both passes), so G decides which draws a task's rows get. Data-parallel, each rank computes its rows' gradients
and a reduce-scatter leaves it the mean over ranks on its shard of the entries [lo, hi); it scores only that
shard, and `gather_candidates` merges every rank's candidates exactly, so every rank applies the same flips.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from harmodt_fast import ops
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.distributed import Distributed
from harmodt_fast.ops.harmony_rows import Candidates, merge_candidates

AGREEMENT_ENTRIES = 16384  # entries (evenly spaced) the task-agreement diagnostic samples when the rows are not kept
DEFAULT_UPDATE_MB = 256.0  # the rows' budget when mask_update_memory_mb is None ("auto") and the device is not CUDA
AUTO_FREE_FRACTION = 0.5  # "auto" on CUDA: the rows may take this share of the free memory (the rest: the backward)


def update_group_size(config: HarmoDTConfig, total: int, free_bytes: int | None = None) -> int:
    """G (1..T): the tasks whose float32 gradient rows over `total` entries fit the budget: mask_update_memory_mb
    when set; else ("auto") AUTO_FREE_FRACTION of `free_bytes` (a CUDA device's free memory: every task whenever
    the whole [T, P] buffer fits), or DEFAULT_UPDATE_MB when free_bytes is None (the CPU). A pure function."""
    if config.mask_update_memory_mb is not None:
        budget = config.mask_update_memory_mb * 2**20
    elif free_bytes is not None:
        budget = AUTO_FREE_FRACTION * free_bytes
    else:
        budget = DEFAULT_UPDATE_MB * 2**20
    return max(1, min(config.num_tasks, int(budget // max(1, 4 * total))))


def free_device_bytes(device: torch.device) -> int | None:
    """What a new tensor may take on a CUDA device: the driver's free memory plus the caching allocator's unused
    reserve (the training step's activations, freed); None off CUDA (update_group_size's free_bytes)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
               - torch.cuda.memory_allocated(device))


def task_gradient_rows(model, batch, first: int, last: int, out: torch.Tensor, *, losses_fn: Callable,
                       amp_dtype: torch.dtype | None) -> None:
    """Tasks first..last-1's gradients into out [last-first, P] (float32, overwritten), from ONE backward over those
    tasks' rows only (HarmoDT.recording_task_grads)."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    try:
        with model.recording_task_grads(first, last, out):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = losses_fn(batch.task_slice(first, last))
            losses.sum().backward()  # the sum: task t's rows see only their own loss
    finally:
        model.zero_grad(set_to_none=True)


def task_gradients(model, batch, *, losses_fn: Callable, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Every task's (unclipped) gradient, float32 [T, P], from one backward over the batch."""
    T = model.task_masks().num_tasks
    grads = torch.empty(T, sum(model.masked_sizes()), device=next(model.parameters()).device)
    task_gradient_rows(model, batch, 0, T, grads, losses_fn=losses_fn, amp_dtype=amp_dtype)
    return grads


def _norm_pieces(sizes: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi) cut at the layer boundaries and every 2^20 entries (global positions: the same pieces whichever
    rows buffer holds them), as ranges relative to lo."""
    cuts = {lo, hi}
    start = 0
    for n in sizes:
        cuts.update(c for c in range(start, start + n, 1 << 20) if lo < c < hi)
        start += n
        if lo < start < hi:
            cuts.add(start)
    edges = sorted(cuts)
    return [(a - lo, b - lo) for a, b in zip(edges, edges[1:])]


NORM_FAN_IN = 32  # |g_t|² is summed 32 entries at a time (a reduction of <= 32 is one fixed pattern on any device)


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of x [G, L] (float64), its sum as a tree of sums of NORM_FAN_IN consecutive values (the last one of a
    level shorter): each sum reduces at most 32 entries of one row, whatever G is, so a row's result does not
    depend on the other rows (a reduction over a whole row would: its split over threads follows the shape)."""
    while x.shape[1] > 1:
        full = x.shape[1] // NORM_FAN_IN * NORM_FAN_IN
        parts = [x[:, :full].reshape(x.shape[0], -1, NORM_FAN_IN).sum(dim=2)] if full else []
        if full < x.shape[1]:
            parts.append(x[:, full:].sum(dim=1, keepdim=True))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return x[:, 0]


def clip_factors(rows: torch.Tensor, max_norm: float, sizes: list[int], offset: int = 0,
                 dist: Distributed | None = None) -> torch.Tensor:
    """Per row (task), min(1, max_norm / (|g_t| + 1e-6)) as float32 [G] (published clip: 0.25). |g_t|² is summed in
    float64 over fixed pieces of the entries (`_sum_rows` within each piece, then over the pieces), so any grouping
    of the rows gives the same factors, bit for bit; a few ops per piece, none per row. rows may be a shard
    (entries offset..); `dist` then sums the squares over the ranks."""
    pieces = _norm_pieces(sizes, offset, offset + rows.shape[1])
    per_piece = [_sum_rows(rows[:, a:b].to(torch.float64, copy=True).square_()) for a, b in pieces]
    squares = _sum_rows(torch.stack(per_piece, dim=1))
    if dist is not None:
        dist.sum_([squares])
    norms = squares.sqrt().float()
    return torch.clamp(max_norm / (norms + 1e-6), max=1.0)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class TaskGradientPasses:
    """The clipped task gradients of one mask update, G tasks at a time (see the module docstring):

        passes = TaskGradientPasses(model, batch, config, losses_fn=..., amp_dtype=..., dist=...)
        gbar = passes.harmony_gradient()          # ḡ on this rank's entries [lo, hi), float64 (None: rows kept)
        for first, rows in passes.clipped_rows():  # rows [G', hi - lo]: tasks first..first+G'-1
            ...
        passes.agreement()                         # task-gradient cosine [T, T]
    """

    def __init__(self, model, batch, config: HarmoDTConfig, *, losses_fn: Callable, amp_dtype: torch.dtype | None,
                 dist: Distributed = Distributed(), tasks_per_pass: int | None = None):
        self.model, self.batch, self.config, self.dist = model, batch, config, dist
        self.losses_fn, self.amp_dtype = losses_fn, amp_dtype
        self.device = next(model.parameters()).device
        self.sizes = model.masked_sizes()
        self.T, self.P = config.num_tasks, sum(self.sizes)
        self.group = min(self.T, tasks_per_pass or update_group_size(config, self.P, self._free_bytes()))
        self.lo, self.hi = dist.shard_range(self.P)  # (0, P) on one process
        # every task's rows fit (one process): one pass, the buffer is kept
        self.keep = self.group == self.T and dist.world == 1
        self.passes = 1 if self.keep else 2 * -(-self.T // self.group)
        self._buffer = torch.empty(self.group, self.P, device=self.device)  # the one [G, P] buffer
        self._factors = torch.ones(self.T, device=self.device)
        self._rng = _rng_state(self.device)
        self._sample_at = (torch.arange(min(self.P, AGREEMENT_ENTRIES), device=self.device) * self.P) // max(
            1, min(self.P, AGREEMENT_ENTRIES))
        self._sample = torch.zeros(self.T, self._sample_at.numel(), device=self.device)

    def _free_bytes(self) -> int | None:
        """The free device memory "auto" plans with (CUDA), the least over the ranks: every rank must take the same
        G (the same collectives)."""
        free = free_device_bytes(self.device)
        if free is None or self.dist.world == 1:
            return free
        return min(int(t) for t in self.dist.all_gather_tensor(torch.tensor([free], device=self.device)))

    def _groups(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Each group's rows, averaged over the ranks on this rank's shard (unclipped); both passes replay the RNG,
        so they see the same dropout."""
        _set_rng_state(self.device, self._rng)
        for first in range(0, self.T, self.group):
            last = min(self.T, first + self.group)
            rows = self._buffer[: last - first]
            task_gradient_rows(self.model, self.batch, first, last, rows, losses_fn=self.losses_fn,
                               amp_dtype=self.amp_dtype)
            yield first, rows

    def harmony_gradient(self) -> torch.Tensor | None:
        """The first pass: clip factors, the agreement sample and ḡ = (1/T) Σ_t g_t, float64 [hi - lo]; None when
        the rows are kept (every task's rows then reach the selection at once, and it sums ḡ from them)."""
        gbar = None if self.keep else torch.zeros(self.hi - self.lo, dtype=torch.float64, device=self.device)
        for first, rows in self._groups():
            last = first + rows.shape[0]
            if not self.keep:
                self._sample[first:last] = rows[:, self._sample_at]
            shard = self.dist.reduce_scatter_mean(rows)  # the rows themselves on one process
            self._factors[first:last] = clip_factors(shard, self.config.task_grad_clip, self.sizes, self.lo, self.dist)
            shard.mul_(self._factors[first:last, None])
            if gbar is None:
                continue
            # in the reference's order, t = 0, 1, ..., T-1: a float64 add per row (float32 -> float64 is exact); a
            # cumulative op would keep the order on the CPU only (on CUDA a one-column scan is a tree)
            for r in range(last - first):
                gbar.add_(shard[r])
        return None if gbar is None else gbar.div_(torch.tensor(float(self.T), dtype=torch.float64,
                                                                 device=self.device))

    def clipped_rows(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The clipped rows of every task on this rank's shard, group by group: the kept buffer, or a second pass."""
        if self.keep:
            yield 0, self._buffer
            return
        for first, rows in self._groups():
            shard = self.dist.reduce_scatter_mean(rows)
            yield first, shard.mul_(self._factors[first : first + rows.shape[0], None])

    def weights(self, needed: bool) -> torch.Tensor:
        """The masked weights on this rank's entries [hi - lo] (a stride-0 zero when the score does not read them)."""
        if needed:
            return self.model.masked_weights_flat()[self.lo : self.hi]
        return torch.zeros((), device=self.device).expand(self.hi - self.lo)

    def agreement(self) -> torch.Tensor:
        """Cosine similarity of the task gradients [T, T]: exact from the kept rows, else estimated on
        AGREEMENT_ENTRIES sampled entries (averaged over the ranks)."""
        if self.keep:
            return ops.task_agreement(self._buffer)
        if self.dist.world > 1:
            self.dist.average([self._sample])
        return ops.task_agreement(self._sample)

    def release(self) -> None:
        """Frees the [G, P] buffer (before the flips are applied)."""
        self._buffer = self._sample = None


def gather_candidates(dist: Distributed, cands: Candidates, k: list[int]) -> Candidates:
    """Every rank's candidates (of its shard of the entries) merged into the exact selection over all entries."""
    if dist.world == 1:
        return cands
    gathered = zip(*(dist.all_gather_tensor(getattr(cands, f)) for f in Candidates.__dataclass_fields__))
    return merge_candidates([Candidates(*fields) for fields in gathered], k)
