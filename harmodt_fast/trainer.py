"""The bi-level HarmoDT trainer, top to bottom.

Inner level, every step: one mixed batch with `batch_per_task` sequences of every task (rows grouped by task);
the loss is the mean of the per-task action MSEs, so the gradient of weight W is (1/T) Σ_t M_t ⊙ G_t and each task
moves only the entries of its own mask. AdamW with linear warm-up, global gradient-norm clip; weights that no task
uses are left exactly as they are (no decay, no momentum drift). `schedule="round-robin"` instead trains one task
per step, in turn, as the published code does.

Outer level, every `mask_interval` steps (method "harmodt"): every task's gradient from ONE backward pass over a
mixed batch (the masked layers add each task's dY_tᵀX_t into a [T, P] buffer), per-task norm clip, then
`hf.ops.harmony_update` with k flips from the raised-cosine schedule (or a share of each task's active weights).

Everything a resumed run needs is in the checkpoint, written atomically; a run killed between checkpoints resumes
from the last one and, on the CPU, reproduces the uninterrupted run exactly.

Data-parallel over processes: under `torchrun --nproc_per_node=N -m harmodt_fast train ...` (WORLD_SIZE > 1) every
process samples its own mixed batch (sampler seed + 7919 * rank), gradients and the per-task gradients of a mask
update are averaged across processes, rank 0 writes logs and checkpoints (with every rank's sampler and RNG state),
and each checkpoint verifies that all ranks hold the same parameters and masks.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch

from harmodt_fast import ops
from harmodt_fast._io import atomic_write
from harmodt_fast.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    prompt_to_dict,
    save_atomic,
)
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.masks import TaskMasks, flip_count
from harmodt_fast.model import HarmoDT
from harmodt_fast.tasks import resolve_tasks

@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Joins the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world), device


# config fields that only change logging, not the training trajectory: a resumed run may change them
# (the backend and compile too: they compute the same step, to rounding)
_NON_TRAJECTORY_FIELDS = {"log_every", "checkpoint_every", "eval_every", "eval_episodes", "tensorboard", "extra",
                          "backend", "compile"}


@dataclass
class TrainResult:
    checkpoint: str
    history: list[dict]
    masks: TaskMasks | None
    config: HarmoDTConfig
    out: str
    step: int
    metrics: str = field(default="")


def train(data, out, preset: str = "demo", steps: int | None = None, device: str = "auto", *,
          stop_at: int | None = None, progress: bool = True, **overrides) -> TrainResult:
    """Trains HarmoDT (or the prompt-dt / mtdt baselines) on an offline dataset and returns a TrainResult.

    data: a dataset folder (hf.collect output or the MTDiff layout) or a loaded dataset; out: the run folder
    (resumed when it holds a checkpoint); overrides: HarmoDTConfig fields by name; stop_at: stop (with a checkpoint)
    once this many steps are done, to be resumed later.
    """
    if "tasks" in overrides and overrides["tasks"] is not None:
        overrides["tasks"] = tuple(resolve_tasks(overrides["tasks"]))
    if steps is not None:
        if int(steps) <= 0:
            raise ValueError(f"steps must be > 0, got {steps}")
        overrides["steps"] = int(steps)
    config = HarmoDTConfig.from_preset(preset, **overrides)  # unknown preset / field / value -> ValueError
    if stop_at is not None and not 0 < stop_at <= config.steps:
        raise ValueError(f"stop_at must be in 1..{config.steps}, got {stop_at}")
    ops.check_backend(config.backend, _pick_device(device))  # before loading data or building anything
    out = _prepare_out(out)
    dataset = _load(data)
    config = _bind_tasks(config, dataset)
    from harmodt_fast.data import MultiTaskSampler

    dist_info, device = init_distributed(_pick_device(device))
    sampler = MultiTaskSampler(dataset, config, device=device, seed=config.seed + 7919 * dist_info.rank)
    trainer = Trainer(config, sampler, out, device, fingerprint=str(dataset.fingerprint), dist=dist_info)
    return trainer.run(stop_at=stop_at, progress=progress)


def _prepare_out(out) -> str:
    out = os.path.abspath(os.fspath(out))
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")  # per process: data-parallel ranks share out
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"cannot write to the output folder {out}: {exc}") from exc
    return out


def _load(data):
    if hasattr(data, "episodes") and hasattr(data, "tasks"):
        return data
    from harmodt_fast.data import load_dataset

    return load_dataset(data)


def _bind_tasks(config: HarmoDTConfig, dataset) -> HarmoDTConfig:
    """Fills config.tasks from the dataset when not given; checks names and dimensions before any work."""
    tasks = config.tasks or tuple(dataset.tasks)
    missing = [t for t in tasks if t not in dataset.tasks]
    if missing:
        raise ValueError(f"task(s) {missing} are not in the dataset (it has {list(dataset.tasks)})")
    first = dataset.episodes(tasks[0])[0]
    state_dim, act_dim = first["observations"].shape[1], first["actions"].shape[1]
    if (state_dim, act_dim) != (config.state_dim, config.act_dim):
        raise ValueError(f"dataset dims (state {state_dim}, action {act_dim}) do not match the model "
                         f"(state_dim {config.state_dim}, act_dim {config.act_dim})")
    return HarmoDTConfig.from_dict({**config.to_dict(), "tasks": list(tasks)})


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return dev


def autocast_dtype(config: HarmoDTConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16) unless fp32 is asked for."""
    if config.precision == "fp32":
        return None
    if config.precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    native = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or getattr(
        torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native else None


class Trainer:
    """One training run. `sampler` gives mixed batches (`.sample()`, `.sample(task=t)`) and the per-task
    normalisation and prompts the checkpoint keeps (the MultiTaskSampler of harmodt_fast.data)."""

    def __init__(self, config: HarmoDTConfig, sampler, out: str, device: torch.device, fingerprint: str,
                 dist: Distributed = Distributed()):
        self.config, self.out, self.device, self.dist = config, _prepare_out(out), device, dist
        self.ckpt_path = os.path.join(self.out, CHECKPOINT_NAME)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        ops.check_backend(config.backend, device)
        torch.manual_seed(config.seed)
        self.model = HarmoDT(config).to(device)  # identical on every rank
        if dist.world > 1:
            torch.manual_seed(config.seed + 7919 * dist.rank)  # but each rank its own dropout
        self.sampler = sampler
        self.fingerprint = fingerprint
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.amp_dtype = autocast_dtype(config, device)
        self._task_losses = _compiled_task_losses(self.model, config) if config.compile else self.model.task_losses
        self.step = 0
        self.history: list[dict] = []
        self.task_agreement: torch.Tensor | None = None
        self._unused: dict[str, torch.Tensor] = {}
        self._tensorboard = _tensorboard_writer(self.out) if config.tensorboard and dist.main else None
        if os.path.exists(self.ckpt_path):
            self._resume(load_checkpoint(self.ckpt_path))
        self._refresh_unused()

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None, progress: bool = True) -> TrainResult:
        cfg = self.config
        end = stop_at or cfg.steps
        stop = {"signal": None}
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        in_main_thread = True
        try:
            for s in previous:
                signal.signal(s, lambda signum, frame: stop.update(signal=signum))
        except ValueError:  # not the main thread: no signal handling, checkpoints still land periodically
            in_main_thread = False
        bar = _progress(self.step, end, progress and self.dist.main)
        t_last, rows_since = time.perf_counter(), 0
        try:
            while self.step < end and not self._should_stop(stop["signal"] is not None):
                loss, per_task, rows = self._train_step()
                self.step += 1
                rows_since += rows
                if self.config.use_masks and self.step % cfg.mask_interval == 0 and self.step < cfg.steps:
                    self._log({"step": self.step, "mask_update": self._mask_update()})
                if self.step == 1 or self.step % cfg.log_every == 0 or self.step == end:
                    loss, per_task = float(loss), per_task.float().cpu().tolist()  # the only read-back
                    now = time.perf_counter()
                    entry = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                             "sequences_per_s": rows_since * self.dist.world / max(now - t_last, 1e-9),
                             "task_loss": dict(zip(self.sampler.tasks, per_task))}
                    t_last, rows_since = now, 0
                    self.history.append({"step": self.step, "loss": loss})
                    self._log(entry)
                    bar.set_postfix(loss=f"{loss:.4f}", seq_s=f"{entry['sequences_per_s']:.0f}")
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._evaluate()
        finally:
            bar.close()
            if in_main_thread:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        self.save()
        if stop["signal"] is not None:
            raise KeyboardInterrupt(f"training stopped by signal {stop['signal']} at step {self.step}; "
                                    f"the checkpoint in {self.out} resumes it")
        if cfg.eval_every and self.step == cfg.steps:
            self._evaluate()
        return TrainResult(self.ckpt_path, list(self.history), self.model.task_masks(), cfg, self.out, self.step,
                           self.metrics_path)

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimiser step; returns (loss, per-task losses) as device tensors and the rows trained on."""
        cfg = self.config
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.schedule == "round-robin":
            batch = self.sampler.sample(task=self.step % cfg.num_tasks)
        else:
            batch = self.sampler.sample()
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            losses = self._task_losses(batch)
        loss = losses.sum() if cfg.schedule == "round-robin" else losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.world > 1:
            self._average_across_ranks([p.grad for p in self.model.parameters() if p.grad is not None])
            reported = torch.cat([loss.detach().float().view(1), losses.detach().float()])
            self._average_across_ranks([reported])
            loss, losses = reported[0], reported[1:]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        layers = self._layers
        # torch.where with the precomputed masks, not weight[unused] (a nonzero: a host sync per layer)
        kept = {n: layers[n].weight.detach().clone() for n in self._unused}
        self.optimizer.step()
        with torch.no_grad():  # weights no task uses stay exactly as they were (no decay, no momentum drift)
            for name, unused in self._unused.items():
                weight = layers[name].weight
                weight.copy_(torch.where(unused, kept[name], weight))
        # tensors, read back by the caller only on log steps
        return loss.detach(), losses.detach(), batch.num_rows

    # ---- the outer level: harmony mask update ----------------------------------------------------------------
    def _mask_update(self) -> dict:
        cfg, model = self.config, self.model
        layers = self._layers
        sizes = [layer.weight.numel() for layer in layers.values()]
        grads = torch.zeros(cfg.num_tasks, sum(sizes), device=self.device)
        start = 0
        for layer, n in zip(layers.values(), sizes):  # each layer writes into its slice of one [T, P] buffer
            layer.task_grads = grads[:, start : start + n].view(cfg.num_tasks, *layer.weight.shape)
            start += n
        try:
            batch = self.sampler.sample()
            model.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                losses = model.task_losses(batch)
            losses.sum().backward()  # one backward: every task's gradient of its own loss
        finally:
            for layer in layers.values():
                layer.task_grads = None
            model.zero_grad(set_to_none=True)
        if self.dist.world > 1:
            self._average_across_ranks([grads])
        norms = grads.norm(dim=1, keepdim=True)
        grads.mul_(torch.clamp(cfg.task_grad_clip / (norms + 1e-6), max=1.0))
        masks = model.task_masks()
        if cfg.flip_fraction > 0:
            k = [int(round(cfg.flip_fraction * c)) for c in masks.active_counts().tolist()]
        else:
            k = flip_count(self.step, cfg.steps, cfg.eta_min, cfg.eta_max)
        weight_flat = torch.cat([layer.weight.detach().flatten() for layer in layers.values()]).float()
        old_flat = masks.flat_packed()
        new_flat, stats = ops.harmony_update(weight_flat, grads, old_flat, k, cfg.gamma, cfg.score)
        new_masks = masks.with_flat_packed(new_flat)
        model.set_masks(new_masks)
        self._refresh_unused()
        self.task_agreement = ops.task_agreement(grads).cpu()
        overlap = new_masks.overlap()
        off_diag = overlap[~torch.eye(cfg.num_tasks, dtype=torch.bool)]
        return {
            "k": k if isinstance(k, int) else sum(k),
            "flips": int(stats["pruned"].sum()),
            "mean_agreement": float(stats["mean_agreement"].mean()),
            "conflict_fraction": float(stats["conflict_fraction"].mean()),
            "mean_overlap": float(off_diag.mean()) if off_diag.numel() else 1.0,
            "density": new_masks.density(),
            "backend": ops.last_backend("harmony_update"),
        }

    # ---- data parallel ------------------------------------------------------------------------------------------
    def _average_across_ranks(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor becomes its mean over the ranks (one all-reduce of a flat buffer)."""
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.dist.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def _should_stop(self, local: bool) -> bool:
        """A signal stops every rank at the same step (a rank that left early would hang the others)."""
        if self.dist.world == 1:
            return local
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _gather(self, obj) -> list:
        if self.dist.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.dist.world
        dist.all_gather_object(out, obj)
        return out

    def _check_ranks_in_sync(self) -> None:
        sums = [float(t.double().sum()) for t in self.model.state_dict().values() if t.is_floating_point()]
        masks = self.model.task_masks()
        fingerprint = (sums, masks.flat_packed().sum().item() if masks is not None else 0)
        every = self._gather(fingerprint)
        if any(f != every[0] for f in every):
            raise RuntimeError(f"data-parallel ranks hold different parameters or masks at step {self.step}")

    @property
    def _layers(self):
        return self.model.masked_layers()

    def _refresh_unused(self) -> None:
        """Per masked layer, the entries no task uses (only layers that have any)."""
        self._unused = {}
        masks = self.model.task_masks()
        if masks is None:
            return
        for name in masks.names:
            unused = ~masks.to_dense(name).any(0).to(self.device)
            if unused.any():
                self._unused[name] = unused

    # ---- evaluation, logs, checkpoints -------------------------------------------------------------------------
    def _evaluate(self) -> None:
        from harmodt_fast.evaluation import evaluate

        self.save()
        if self.dist.main:
            report = evaluate(self.ckpt_path, episodes=self.config.eval_episodes, seed=self.config.seed,
                              device=str(self.device))
            self._log({"step": self.step, "eval": report})
        self._barrier()

    def _barrier(self) -> None:
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _log(self, entry: dict) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(entry, default=_json_default) + "\n")
        if self._tensorboard is not None:
            for tag, value in _scalars(entry):
                self._tensorboard.add_scalar(tag, value, entry["step"])
            self._tensorboard.flush()

    def save(self) -> str:
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        samplers = self._gather(self.sampler.state_dict())
        rngs = self._gather({"torch": torch.get_rng_state(), "cuda": cuda_rng})
        if self.dist.world > 1:
            self._check_ranks_in_sync()
        if not self.dist.main:
            self._barrier()
            return self.ckpt_path
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tasks": list(self.sampler.tasks),
            "state_mean": self.sampler.state_mean.float().cpu(),
            "state_std": self.sampler.state_std.float().cpu(),
            "eval_prompts": prompt_to_dict(self.sampler.eval_prompt()) if self.config.use_prompt else None,
            "dataset_fingerprint": self.fingerprint,
            "world_size": self.dist.world,
            "sampler": samplers,  # one state per rank
            "rng": rngs,
            "history": self.history,
            "task_agreement": self.task_agreement,
        }
        save_atomic(state, self.ckpt_path)
        self._barrier()
        return self.ckpt_path

    def _resume(self, ckpt: dict) -> None:
        mine, theirs = self.config.to_dict(), dict(ckpt["config"])
        diff = sorted(k for k in mine if k not in _NON_TRAJECTORY_FIELDS and mine[k] != theirs.get(k))
        if diff:
            details = ", ".join(f"{k}: {theirs.get(k)!r} there vs {mine[k]!r} now" for k in diff[:6])
            raise CheckpointError(f"{self.ckpt_path} belongs to a run with another config ({details}); "
                                  f"use another output folder (it was not overwritten)")
        if ckpt.get("dataset_fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.ckpt_path} was trained on other data (fingerprint "
                                  f"{ckpt.get('dataset_fingerprint')} vs {self.fingerprint}); use another output "
                                  f"folder (it was not overwritten)")
        if ckpt.get("world_size", 1) != self.dist.world:
            raise CheckpointError(f"{self.ckpt_path} was written by {ckpt.get('world_size', 1)} data-parallel "
                                  f"process(es), this run has {self.dist.world}; resume with the same count")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        rank = self.dist.rank
        self.sampler.load_state_dict(ckpt["sampler"][rank])
        torch.set_rng_state(ckpt["rng"][rank]["torch"])
        if ckpt["rng"][rank].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], self.device)
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.task_agreement = ckpt.get("task_agreement")
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drops log lines written after the checkpoint we resume from (the steps are about to be redone)."""
        if not self.dist.main or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.metrics_path, lambda f: f.writelines(kept), binary=False)


def _compiled_task_losses(model: HarmoDT, config: HarmoDTConfig):
    """model.task_losses under torch.compile. The task offsets enter the graph as host ints (the masked ops need
    them on the host), so each distinct offsets gets its own graph: one for the mixed schedule, one per task for
    round-robin; the recompile limit is raised to hold them all."""
    import dataclasses

    import torch._dynamo

    cfg = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit_name, max(getattr(cfg, limit_name), config.num_tasks + 8))
    # the Triton attention draws its dropout seed on the host (an .item()), which breaks the graph once per block
    device = next(model.parameters()).device
    seeded = config.use_masks and config.dropout > 0 and ops.runs_fused("masked_attention", config.backend, device)
    # HARMODT_FAST_COMPILE_BACKEND: another torch.compile backend (e.g. aot_eager: traces, no code generation)
    compiled = torch.compile(model.task_losses, dynamic=False, fullgraph=not seeded,
                             backend=os.environ.get("HARMODT_FAST_COMPILE_BACKEND", "inductor"))

    def task_losses(batch):
        # offsets and row task ids are settled outside the graph (reading a tensor's values would break it)
        return compiled(dataclasses.replace(batch, task_offsets=tuple(int(o) for o in batch.task_offsets),
                                            row_tasks=batch.task_ids))

    return task_losses


def _tensorboard_writer(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from exc
    return SummaryWriter(os.path.join(out, "tensorboard"))


def _scalars(entry: dict, prefix: str = ""):
    """(tag, number) pairs of a log entry, nested dicts flattened into 'a/b' tags; the step itself is skipped."""
    for key, value in entry.items():
        if key == "step" and not prefix:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


def _progress(start: int, end: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n): ...
            def set_postfix(self, **kw): ...
            def close(self): ...
        return _Null()
    return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
