"""The training/evaluation batch the model consumes: rows grouped into contiguous task segments.

Shapes (B rows = sequences, K = context, Kp = prompt length, S = state dim, A = action dim):
    states [B, K, S] float, actions [B, K, A] float (model inputs and regression targets),
    returns_to_go [B, K, 1] float (already divided by rtg_scale), timesteps [B, K] int64,
    attention_mask [B, K] bool (True = real step; padding is on the left),
    task_offsets [T+1] int64 on the CPU: rows task_offsets[t]:task_offsets[t+1] belong to task t;
    row_tasks [B] int64 on the rows' device, optional: the same as task ids per row, for samplers that have them
    there already (else `task_ids` builds them once per distinct task_offsets and device, then reuses them).
Data-parallel: a batch may be one of `num_slices` equal slices of a global batch (every task's segment cut into
num_slices pieces, one per process). global_task_steps [T] float on the rows' device then holds each task's
valid steps in the WHOLE global batch, so that the per-task losses are normalised as on one process
(HarmoDT.task_losses); None for a whole batch.
A Prompt holds the same fields for each row's task prompt (shapes [B, Kp, ...]).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Prompt:
    states: torch.Tensor
    actions: torch.Tensor
    returns_to_go: torch.Tensor
    timesteps: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Prompt":
        return Prompt(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


@dataclass
class Batch:
    states: torch.Tensor
    actions: torch.Tensor
    returns_to_go: torch.Tensor
    timesteps: torch.Tensor
    attention_mask: torch.Tensor
    task_offsets: torch.Tensor
    prompt: Prompt | None = None
    row_tasks: torch.Tensor | None = None
    global_task_steps: torch.Tensor | None = None
    num_slices: int = 1

    @property
    def num_rows(self) -> int:
        return self.states.shape[0]

    @property
    def task_ids(self) -> torch.Tensor:
        """Task id of every row, [B] int64 on the rows' device (no host-to-device copy per step)."""
        if self.row_tasks is not None and self.row_tasks.device == self.states.device:
            return self.row_tasks
        # tolist: the offsets are host ints in a CPU tensor, read without dispatching an op per entry
        return _task_ids(tuple(self.task_offsets.tolist()), self.states.device)

    def task_slice(self, first: int, last: int) -> "Batch":
        """The rows of tasks first..last-1 as a batch of last-first tasks (ids renumbered from 0): views, no copy."""
        offsets = self.task_offsets.tolist()
        lo, hi = offsets[first], offsets[last]
        rows = {f.name: getattr(self, f.name)[lo:hi] for f in fields(self)
                if f.name not in ("task_offsets", "prompt", "row_tasks", "global_task_steps", "num_slices")}
        prompt = Prompt(**{f.name: getattr(self.prompt, f.name)[lo:hi] for f in fields(self.prompt)}) \
            if self.prompt is not None else None
        row_tasks = self.row_tasks[lo:hi] - first if self.row_tasks is not None else None
        task_offsets = torch.tensor([o - lo for o in offsets[first : last + 1]], dtype=torch.int64)
        # a data-parallel slice keeps the whole batch's valid steps of its tasks (per task, not per row)
        steps = self.global_task_steps[first:last] if self.global_task_steps is not None else None
        return Batch(**rows, task_offsets=task_offsets, prompt=prompt, row_tasks=row_tasks,
                     global_task_steps=steps, num_slices=self.num_slices)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if f.name not in ("task_offsets", "prompt", "row_tasks", "global_task_steps", "num_slices")
        }
        optional = lambda t: t.to(device, non_blocking=non_blocking) if t is not None else None  # noqa: E731
        prompt = self.prompt.to(device, non_blocking) if self.prompt is not None else None
        return Batch(**moved, task_offsets=self.task_offsets, prompt=prompt, row_tasks=optional(self.row_tasks),
                     global_task_steps=optional(self.global_task_steps), num_slices=self.num_slices)


_TASK_IDS: dict[tuple, torch.Tensor] = {}


def _task_ids(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Row task ids for `offsets` on `device`, built once (a copy to a GPU blocks the host) and kept."""
    key = (offsets, str(device))
    hit = _TASK_IDS.get(key)
    if hit is None:
        if len(_TASK_IDS) > 256:  # a few distinct offsets per run (mixed, one per task in round-robin)
            _TASK_IDS.clear()
        counts = torch.tensor(offsets).diff()
        hit = _TASK_IDS[key] = torch.repeat_interleave(torch.arange(counts.numel()), counts).to(device)
    return hit


def rows_per_slice(batch_per_task: int, world: int) -> int:
    """Rows of each task one of `world` data-parallel processes trains on: batch_per_task is the GLOBAL batch per
    task, cut into equal slices (a ValueError when they cannot be equal)."""
    if world < 1 or batch_per_task % world:
        raise ValueError(f"batch_per_task ({batch_per_task}) is the global batch per task and must be divisible by "
                         f"the number of data-parallel processes ({world}); pick a batch_per_task that is a "
                         f"multiple of {world} or another process count")
    return batch_per_task // world


def offsets_from_counts(counts) -> torch.Tensor:
    """Rows per task -> task_offsets [T+1] (CPU int64)."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


def synthetic_batch(config, rows_per_task, generator: torch.Generator | None = None, device="cpu") -> Batch:
    """Random data of the right shapes and ranges (for tests, benchmarks and smoke runs, not for learning).

    rows_per_task: an int or one count per task (zeros give empty task segments). Each row gets a random
    amount of left padding; actions follow a fixed random linear map of the states, so a model can fit them.
    """
    if isinstance(rows_per_task, int):
        rows_per_task = [rows_per_task] * config.num_tasks
    offsets = offsets_from_counts(rows_per_task)
    B, K, Kp, S, A = int(offsets[-1]), config.context, config.prompt_len, config.state_dim, config.act_dim
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    task_map = torch.randn(config.num_tasks, S, A, generator=torch.Generator().manual_seed(1234)) / S**0.5
    task_ids = torch.repeat_interleave(torch.arange(len(rows_per_task)), torch.as_tensor(rows_per_task))

    def segment(length):
        states = torch.randn(B, length, S, generator=g)
        actions = torch.tanh(torch.einsum("bks,bsa->bka", states, task_map[task_ids]))
        rtg = torch.rand(B, length, 1, generator=g) * 4.5
        start = torch.randint(0, config.max_ep_len - length, (B, 1), generator=g)
        timesteps = start + torch.arange(length)
        pad = torch.randint(0, max(1, length // 2), (B, 1), generator=g)
        mask = torch.arange(length) >= pad
        states, actions, rtg = states * mask[..., None], actions * mask[..., None], rtg * mask[..., None]
        return states, actions, rtg, timesteps * mask, mask

    prompt = Prompt(*segment(Kp)) if Kp > 0 else None
    batch = Batch(*segment(K), task_offsets=offsets, prompt=prompt)
    return batch.to(device)


class SyntheticSampler:
    """The sampler interface of harmodt_fast.data.MultiTaskSampler over `synthetic_batch`: for benchmarks and
    smoke runs that must not depend on Meta-World data. Normalisation is the identity."""

    def __init__(self, config, device="cpu", seed: int = 0):
        self.config, self.device = config, torch.device(device)
        self.tasks = list(config.tasks) if config.tasks else [f"task-{t}" for t in range(config.num_tasks)]
        self.generator = torch.Generator().manual_seed(seed)
        self.state_mean = torch.zeros(config.num_tasks, config.state_dim)
        self.state_std = torch.ones(config.num_tasks, config.state_dim)
        self.best_return = {t: config.target_return for t in self.tasks}  # no episodes: the fixed target

    def sample(self, task: int | None = None) -> Batch:
        counts = [self.config.batch_per_task] * self.config.num_tasks
        if task is not None:
            counts = [self.config.batch_per_task if t == task else 0 for t in range(self.config.num_tasks)]
        return synthetic_batch(self.config, counts, self.generator, self.device)

    def eval_prompt(self) -> Prompt | None:
        return synthetic_batch(self.config, 1, torch.Generator().manual_seed(0)).prompt

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
