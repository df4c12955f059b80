"""torch.compile of the training step (the config's `compile`):

    false     everything eager
    true      the forward and loss (model.task_losses) compiled; AOTAutograd compiles their backward too
    "step"    also the rest of the step: the gradient clip, then the AdamW step with the restore of the frozen
              entries, as two compiled functions (the CPU's divergence guard reads the clip's norm between them);
              on CUDA as CUDA graphs (mode="reduce-overhead") where that is safe

The learning rate reaches the compiled AdamW step as a tensor (a float would be a constant of the graph: one
recompile per value); between steps the optimiser holds floats, so checkpoints do not depend on the mode.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from harmodt_fast import method, ops
from harmodt_fast.config import HarmoDTConfig


def compile_function(fn: Callable, fullgraph: bool, mode: str | None = None) -> Callable:
    """fn under torch.compile with static shapes, on inductor or the backend HARMODT_FAST_COMPILE_BACKEND names
    (e.g. aot_eager: traces, no code generation; `mode` is inductor's)."""
    backend = os.environ.get("HARMODT_FAST_COMPILE_BACKEND", "inductor")
    return torch.compile(fn, dynamic=False, fullgraph=fullgraph, backend=backend,
                         mode=mode if backend == "inductor" else None)


def dropout_seeded_on_host(config: HarmoDTConfig, device: torch.device) -> bool:
    """Whether the fused attention draws its dropout seed on the host (an .item()): a graph break per block, and
    a seed a CUDA graph would replay as a constant."""
    return config.use_masks and config.dropout > 0 and ops.runs_fused("masked_attention", config.backend, device)


def cuda_graphs_safe(config: HarmoDTConfig, device: torch.device, world: int = 1) -> bool:
    """Whether compile="step" captures CUDA graphs (mode="reduce-overhead"): on CUDA, with one process (DDP's
    gradient hooks run inside the backward) and no dropout seed drawn on the host."""
    return (config.compile == "step" and device.type == "cuda" and world == 1
            and not dropout_seeded_on_host(config, device))


class CompiledStep:
    """The training step's functions for inner_step, as config.compile says: `task_losses` (its losses_fn),
    `clip` (clip_fn) and `apply` (apply_fn); eager where not compiled. `begin_step()` before each step (it marks
    a new CUDA-graph step)."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, config: HarmoDTConfig, device: torch.device,
                 world: int = 1):
        self.cuda_graphs = cuda_graphs_safe(config, device, world)
        mode = "reduce-overhead" if self.cuda_graphs else None
        if config.compile:
            _prepare(model, config, device)
        self.task_losses = compiled_task_losses(model, config, device, mode) if config.compile else model.task_losses
        self.clip, self.apply = method.clip_gradients, method.apply_gradients
        if config.compile == "step":
            self.clip = compile_function(method.clip_gradients, fullgraph=True, mode=mode)
            # not fullgraph: optimizer.step() breaks the graph before and after itself (so that AOTAutograd
            # sees an inference graph and updates the parameters in place)
            self.apply = _TensorLearningRate(optimizer, compile_function(method.apply_gradients, False, mode))

    def begin_step(self) -> None:
        if self.cuda_graphs:  # the last step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()


class _TensorLearningRate:
    """Calls a compiled apply_gradients with every group's lr as a tensor (one per group, refilled in place), and
    puts the floats back after it."""

    def __init__(self, optimizer: torch.optim.Optimizer, apply: Callable):
        self.apply = apply
        device = optimizer.param_groups[0]["params"][0].device
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]

    def __call__(self, optimizer: torch.optim.Optimizer, weights: dict, frozen: method.FrozenEntries) -> None:
        floats = [group["lr"] for group in optimizer.param_groups]
        for group, lr, value in zip(optimizer.param_groups, self.lrs, floats):
            lr.fill_(value)
            group["lr"] = lr
        try:
            self.apply(optimizer, weights, frozen)
        finally:
            for group, value in zip(optimizer.param_groups, floats):
                group["lr"] = value


def _prepare(model, config: HarmoDTConfig, device: torch.device) -> None:
    """Room for a graph per distinct task offsets (round-robin: one per task) and per frozen-entry layout; before
    any trace, the cpp backend's fake kernels registered (they register as the extension loads) and the dropout's
    backend decided (a first decision imports its implementation, which dynamo cannot trace)."""
    import torch._dynamo

    from harmodt_fast.model import Dropout

    cfg = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit_name, max(getattr(cfg, limit_name), config.num_tasks + 8))
    if device.type == "cpu":
        from harmodt_fast._ext import load_extension

        load_extension()
    for module in model.modules():
        if isinstance(module, Dropout):
            ops.check_backend(module.backend, device, ops=("dropout",))


def compiled_task_losses(model, config: HarmoDTConfig, device: torch.device, mode: str | None = None):
    """model.task_losses under torch.compile. The task offsets enter the graph as host ints (the masked ops need
    them on the host), so each distinct offsets gets its own graph: one for the mixed schedule, one per task for
    round-robin."""
    # the Triton attention draws its dropout seed on the host (an .item()), which breaks the graph once per block
    compiled = compile_function(model.task_losses, not dropout_seeded_on_host(config, device), mode)

    def task_losses(batch):
        # offsets and row task ids are settled outside the graph (reading a tensor's values would break it)
        return compiled(dataclasses.replace(batch, task_offsets=tuple(batch.task_offsets.tolist()),
                                            row_tasks=batch.task_ids))

    return task_losses
