"""The training loop around HarmoDT's steps (harmodt_fast/method.py): batches, the inner step, mask updates every
`mask_interval` steps, logs, periodic evaluation, checkpoints, signals and data-parallel processes.

Everything a resumed run needs is in the checkpoint, written atomically; a run killed between checkpoints resumes
from the last one and, on the CPU, reproduces the uninterrupted run exactly. Under torchrun (WORLD_SIZE > 1)
every process draws the same global batch (batch_per_task rows per task) and trains on its slice of it, torch's
DistributedDataParallel averages the gradients during backward (so W processes follow one process's trajectory,
to rounding), rank 0 writes logs and checkpoints (one sampler state, every rank's RNG state), a run resumes on
another process count, and each checkpoint verifies by hash that all ranks hold the same parameters and masks
(docs/distributed.md).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field, replace

import torch

from harmodt_fast import ops
from harmodt_fast import run_folder
from harmodt_fast.callbacks import RunCheckpoints, check_callbacks, dispatch
from harmodt_fast._io import FolderLock, append_json_line
from harmodt_fast.batch import rows_per_slice
from harmodt_fast.checkpoint import CHECKPOINT_NAME, RunState, prompt_to_dict
from harmodt_fast.compiled import CompiledStep
from harmodt_fast import method
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.distributed import Distributed, init_distributed, world_size_from_env
from harmodt_fast.loggers import METRICS_NAME, Loggers
from harmodt_fast.masks import TaskMasks
from harmodt_fast.model import HarmoDT
from harmodt_fast.memory_plan import refuse_if_over_memory
from harmodt_fast.run_folder import DivergenceError, TrainingError, TrainingStopped
from harmodt_fast.runtime import autocast_dtype, pick_device, progress_bar


@dataclass
class TrainResult:
    checkpoint: str
    history: list[dict]
    masks: TaskMasks | None
    config: HarmoDTConfig
    out: str
    step: int
    metrics: str = field(default="")
    stopped_early: bool = False  # a callback asked to stop, stop_reason says which and why
    stop_reason: str = ""


def train(data, out, preset: str | None = None, steps: int | None = None, device: str = "auto", *,
          config=None, stop_at: int | None = None, progress: bool = True, check_memory: bool = True, callbacks=(),
          **overrides) -> TrainResult:
    """Trains HarmoDT (or the prompt-dt / mtdt baselines) on an offline dataset and returns a TrainResult.

    data: a dataset folder (hf.collect output or the MTDiff layout) or a loaded dataset; out: the run folder
    (resumed when it holds a checkpoint); config: a YAML or JSON file of HarmoDTConfig fields (HarmoDTConfig.from_file:
    over the preset, under the overrides); preset: the base (None: the file's `preset:`, else "demo"); overrides:
    HarmoDTConfig fields by name; stop_at: stop (with a checkpoint) once this many steps are done, to be resumed
    later; check_memory: refuse (ValueError) a run whose planned peak memory (hf.plan) exceeds the device's, before
    any data is read or the model built; False runs it anyway; callbacks: objects called during training, which may
    stop it (harmodt_fast/callbacks.py). The run folder keeps the resolved config as config.yaml.
    """
    if steps is not None:
        overrides["steps"] = steps  # the config checks it (an integer > 0)
    # unknown preset / field / value, or a config file that does not parse -> ValueError naming them
    config, given = HarmoDTConfig.resolve(preset, config, overrides)
    explicit_dims = {k: given[k] for k in ("state_dim", "act_dim") if k in given}
    if stop_at is not None and not 0 < stop_at <= config.steps:
        raise ValueError(f"stop_at must be in 1..{config.steps}, got {stop_at}")
    asked = pick_device(device)
    ops.check_backend(config.backend, asked)  # before loading data or building anything
    rows_per_slice(config.batch_per_task, world_size_from_env())  # a global batch the processes can share
    out = run_folder.prepare(out)
    # the folder is this run's before anything is read from it; data-parallel, rank 0 (the writer) holds it
    lock = run_folder.lock(out)
    try:
        if os.environ.get("RANK", "0") == "0":
            lock.acquire()
        dataset = _load(data)  # opened: its files are read per task on first use
        if check_memory:  # the task count is the dataset's when not given; its data and the model are not loaded
            refuse_if_over_memory(HarmoDTConfig.from_dict({**config.to_dict(),
                                                           "tasks": config.tasks or dataset.tasks}), asked)
        config = _bind_tasks(config, dataset, explicit_dims)
        from harmodt_fast.data import MultiTaskSampler

        dist_info, device = init_distributed(asked)
        # the same seed on every rank: one global batch, each rank its slice
        sampler = MultiTaskSampler(dataset, config, device=device, seed=config.seed, rank=dist_info.rank,
                                   world=dist_info.world)
        trainer = Trainer(config, sampler, out, device, fingerprint=str(dataset.fingerprint), dist=dist_info,
                          lock=lock, callbacks=callbacks)
        trainer.task_envs = dict(getattr(dataset, "env_specs", {}))  # Minari data: the environments to evaluate
        return trainer.run(stop_at=stop_at, progress=progress)
    finally:
        lock.release()


def _load(data):
    if hasattr(data, "episodes") and hasattr(data, "tasks"):
        return data
    from harmodt_fast.data import load_dataset

    return load_dataset(data)


def _bind_tasks(config: HarmoDTConfig, dataset, explicit_dims: dict) -> HarmoDTConfig:
    """Fills config.tasks from the dataset when not given, and the state and action dimensions from the data
    (every task must agree); checks names and explicitly given dimensions before any work."""
    tasks = config.tasks or tuple(dataset.tasks)
    missing = [t for t in tasks if t not in dataset.tasks]
    if missing:
        raise ValueError(f"task(s) {missing} are not in the dataset (it has {list(dataset.tasks)})")
    if hasattr(dataset, "dims"):
        state_dim, act_dim = dataset.dims(tasks)
    else:  # a dataset-like object of the user's: its first episode decides
        first = dataset.episodes(tasks[0])[0]
        state_dim, act_dim = first["observations"].shape[1], first["actions"].shape[1]
    data_dims = {"state_dim": int(state_dim), "act_dim": int(act_dim)}
    wrong = {k: v for k, v in explicit_dims.items() if v != data_dims[k]}
    if wrong:
        raise ValueError(f"dataset dims (state {state_dim}, action {act_dim}) do not match the model's {wrong}")
    return HarmoDTConfig.from_dict({**config.to_dict(), **data_dims, "tasks": list(tasks)})


class Trainer:
    """One training run. `sampler` gives mixed batches (`.sample()`, `.sample(task=t)`) and the per-task
    normalisation and prompts the checkpoint keeps (the MultiTaskSampler of harmodt_fast.data).

    The run folder is this trainer's (FolderLock on `out`; rank 0 holds it) from construction, before its
    checkpoint is read, until run() returns or raises; a folder in use elsewhere raises TrainingError. `lock`: the
    folder's lock when the caller holds it already (hf.train takes it before reading the data). `callbacks`:
    objects with on_log / on_evaluation / on_mask_update / on_checkpoint (harmodt_fast/callbacks.py)."""

    def __init__(self, config: HarmoDTConfig, sampler, out: str, device: torch.device, fingerprint: str,
                 dist: Distributed = Distributed(), *, lock: FolderLock | None = None, callbacks=()):
        self.config, self.out, self.device, self.dist = config, run_folder.prepare(out), device, dist
        self.callbacks, self.stop_reason = check_callbacks(callbacks), None
        self._lock = lock if lock is not None else run_folder.lock(self.out)
        if dist.main:
            run_folder.hold(self._lock)
        try:
            self._start(config, sampler, device, fingerprint, dist)
        except BaseException:
            self._lock.release()
            raise

    def _start(self, config: HarmoDTConfig, sampler, device: torch.device, fingerprint: str,
               dist: Distributed) -> None:
        dist.check_sampler(sampler, config.batch_per_task)
        self.ckpt_path = os.path.join(self.out, CHECKPOINT_NAME)
        self.metrics_path = os.path.join(self.out, METRICS_NAME)
        ops.check_backend(config.backend, device)
        torch.manual_seed(config.seed)
        self.model = HarmoDT(config).to(device)  # identical on every rank
        if dist.world > 1:
            torch.manual_seed(dist.rank_seed(config.seed))  # but each rank its own dropout
        self.sampler = sampler
        self.fingerprint = fingerprint
        self.optimizer = method.make_optimizer(self.model, config)
        self.amp_dtype = autocast_dtype(config, device)
        self._compiled = CompiledStep(self.model, self.optimizer, config, device, dist.world)  # as config.compile
        self._task_losses = self._compiled.task_losses
        self._watch = method.StepWatch(config.num_tasks, device)  # the divergence guard
        self.step = 0
        self._saved_step: int | None = None  # the step of the checkpoint on disk
        self.history: list[dict] = []
        self.task_agreement: torch.Tensor | None = None
        self._unused = method.FrozenEntries({})  # entries no task uses (refreshed after each mask update)
        self.task_envs: dict[str, str] = {}  # task -> gymnasium EnvSpec JSON, for tasks without a Meta-World name
        if os.path.exists(self.ckpt_path):
            self._resume(RunState.load(self.ckpt_path, warn_resume=dist.main))
        else:  # a run killed before its first checkpoint starts over: so does its log
            self._truncate_metrics(0)
        if dist.main:  # after a refused resume, the folder's config.yaml stays that of its own run
            run_folder.write_config(self.out, config)
        self._unused = method.unused_entries(self.model)
        self._kept = RunCheckpoints(self.out, config.keep_checkpoints, self._saved_step) if dist.main else None
        # every rank started from the same config, data and checkpoint (a RUN folder not shared between nodes, say)
        start = {"config": json.dumps(config.to_dict(), sort_keys=True, default=str), "dataset fingerprint":
                 str(fingerprint), "resumed step": str(self.step)}
        dist.check_same("the run's start", {k: v.encode() for k, v in start.items()}, self.step)
        # the training step's losses: through DDP with several processes (its backward averages the gradients);
        # everything else (mask update, checkpoints, evaluation) uses self.model itself, outside DDP's hooks
        self._step_losses = self._task_losses if dist.world == 1 else dist.data_parallel(
            self.model, self._task_losses, device)
        self._loggers = Loggers(config.logger if dist.main else None, self.out, config)  # after a refused resume

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None, progress: bool = True) -> TrainResult:
        """Trains to stop_at (or config.steps) and returns a TrainResult; the run folder is released on return.
        A signal (SIGINT, SIGTERM) stops it with a checkpoint and raises TrainingStopped; a non-finite loss or
        gradient raises DivergenceError, the last checkpoint kept."""
        if self.dist.main:
            self._lock.acquire()  # a no-op from construction to the first return; a second run() takes it again
        try:
            return self._run(stop_at, progress)
        finally:
            self._lock.release()

    def _run(self, stop_at: int | None, progress: bool) -> TrainResult:
        cfg = self.config
        end = stop_at or cfg.steps
        stop, self.stop_reason = {"signal": None}, None  # a run() again does not inherit the last one's request
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        in_main_thread = True
        try:
            for s in previous:
                signal.signal(s, lambda signum, frame: stop.update(signal=signum))
        except ValueError:  # not the main thread: no signal handling, checkpoints still land periodically
            in_main_thread = False
        if self._evaluation_missing():  # killed during the evaluation that followed the last checkpoint
            self._evaluate()
        bar = progress_bar(end, "train", progress and self.dist.main, initial=self.step)
        t_last, rows_since = time.perf_counter(), 0
        stopped = False
        try:
            while self.step < end and not (stopped := self._stop_requested(
                    stop["signal"] is not None or self.stop_reason is not None)):
                loss, per_task, rows = self._train_step()
                self.step += 1
                rows_since += rows
                if method.mask_update_due(cfg, self.step):
                    self._check_finite()
                    self._log({"step": self.step, "mask_update": self._mask_update()})
                if self.step == 1 or self.step % cfg.log_every == 0 or self.step == end:
                    self._check_finite()
                    loss, per_task = self._mean_over_ranks(loss, per_task)
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
        # every rank stops alike, also for a signal after the last check (one more collective, once per run)
        signalled = self.dist.any(stop["signal"] is not None, self.device)
        self.save()
        if signalled:
            why = (signal.Signals(stop["signal"]).name if stop["signal"] is not None
                   else "a signal to another data-parallel rank")
            raise TrainingStopped(f"training stopped by {why} at step {self.step}; the checkpoint in {self.out} "
                                  f"resumes it", stop["signal"])
        if cfg.eval_every and self.step == cfg.steps and self._evaluation_missing():
            self._evaluate()
        self._loggers.close()
        # stopped without a signal: a callback's request (made on rank 0, the others learnt of it at the stop check)
        reason = (self.stop_reason or "a callback on data-parallel rank 0") if stopped else ""
        return TrainResult(self.ckpt_path, list(self.history), self.model.task_masks(), cfg, self.out, self.step,
                           self.metrics_path, stopped_early=stopped, stop_reason=reason)

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimiser step; returns (loss, per-task losses) as device tensors and the rows trained on."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = method.learning_rate(cfg, self.step)
        task = method.step_task(cfg, self.step)
        batch = self.sampler.sample(task=task) if task is not None else self.sampler.sample()
        frozen = method.frozen_entries(self.model, task, self._unused)
        self._compiled.begin_step()
        try:
            loss, losses = method.inner_step(self.model, self.optimizer, batch, cfg, frozen,
                                             losses_fn=self._step_losses, amp_dtype=self.amp_dtype,
                                             watch=self._watch, step=self.step + 1, clip_fn=self._compiled.clip,
                                             apply_fn=self._compiled.apply)
        except method.NonFiniteStep as exc:
            self._diverged(exc)
        return loss, losses, batch.num_rows

    def _check_finite(self) -> None:
        """The divergence guard's read-back at the steps that synchronise anyway (logs, mask updates, checkpoints;
        on CUDA the only one: a step never waits for the device). Every rank stops alike (one `any` each)."""
        try:
            self._watch.check()
        except method.NonFiniteStep as exc:
            self.dist.any(True, self.device)
            self._diverged(exc)
        if self.dist.any(False, self.device):
            self._diverged(None, "a loss or gradient was not finite on another data-parallel rank")

    def _diverged(self, exc: method.NonFiniteStep | None, problem: str = "") -> None:
        """Raises DivergenceError naming the step, the tasks whose loss was not finite and the checkpoint kept."""
        step, tasks = (exc.step, [self.sampler.tasks[t] for t in exc.tasks]) if exc else (self.step, [])
        if exc is not None:
            problem = (f"the loss of task(s) {', '.join(tasks)} is not finite" if tasks else
                       f"the gradient norm is {exc.grad_norm}") + (
                f"; found at step {self.step} (the steps since moved the weights in memory only)" if exc.taken
                else "; the optimiser did not take the step")
        kept = (f"the checkpoint of step {self._saved_step} in {self.out} is kept" if self._saved_step is not None
                else "no checkpoint was written")
        raise DivergenceError(f"training diverged at step {step}: {problem}; {kept} (lower lr, tighten grad_clip or "
                              f"use precision=fp32)", step, tasks)

    def _mean_over_ranks(self, loss, losses):
        """The reported losses: each rank's are those of its slice, their mean the whole batch's (log steps only:
        no collective on the other steps besides DDP's)."""
        if self.dist.world == 1:
            return loss, losses
        reported = torch.cat([loss.detach().float().view(1), losses.detach().float()])
        self.dist.average([reported])
        return reported[0], reported[1:]

    def _stop_requested(self, local: bool) -> bool:
        """Whether a signal asks to stop. With several processes every _STOP_CHECK_EVERY steps only (the check is
        a collective and a host sync): the steps are the same on every rank, so every rank stops at the same one."""
        if self.dist.world == 1:
            return local
        return self.step % _STOP_CHECK_EVERY == 0 and self.dist.any(local, self.device)

    def request_stop(self, reason: str = "a callback's request") -> None:
        """Stops training after the current step, with a checkpoint; the TrainResult says stopped_early and why."""
        if self.stop_reason is None:
            self.stop_reason = reason

    # ---- the outer level: harmony mask update ----------------------------------------------------------------
    def _mask_update(self) -> dict:
        _, info, agreement = method.mask_update(self.model, self.sampler.sample(), self.config, self.step,
                                                losses_fn=self.model.task_losses, amp_dtype=self.amp_dtype,
                                                dist=self.dist)
        self._check_masks_in_sync()  # every rank applied the same flips, or a loud failure here
        self._unused = method.unused_entries(self.model)
        self.task_agreement = agreement.cpu()
        dispatch(self.callbacks, "on_mask_update", self, info)
        return info

    # ---- data parallel ------------------------------------------------------------------------------------------
    def _check_ranks_in_sync(self) -> None:
        """Every rank holds the same parameters, masks (buffers of the state dict) and sampler state (sha256 of
        each; a RuntimeError naming the ranks and entries that differ)."""
        entries = dict(self.model.state_dict())
        for key, value in self.sampler.state_dict().items():
            entries[f"sampler.{key}"] = value if isinstance(value, torch.Tensor) else repr(value).encode()
        self.dist.check_same("the model state and the sampler state", entries, self.step)

    def _check_masks_in_sync(self) -> None:
        """Every rank holds the same task masks (after a mask update); a RuntimeError otherwise."""
        masks = self.model.task_masks()
        if self.dist.world > 1 and masks is not None:
            # one hash per layer: no flat copy of every mask
            self.dist.check_same("the task masks", {n: masks.packed(n) for n in masks.names}, self.step)

    # ---- evaluation, logs, checkpoints -------------------------------------------------------------------------
    def _evaluate(self) -> None:
        from harmodt_fast.evaluation import evaluate, save_report

        self.save()  # for resuming; the evaluation reads the live model and state, not the file
        if self.dist.main:
            # on forked RNG streams: evaluate reseeds torch's, and training goes on with its own (a run resumed
            # from this checkpoint draws the same)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                report = evaluate(self._policy_state(), model=self.model, episodes=self.config.eval_episodes,
                                  seed=self.config.seed, max_episode_steps=self.config.eval_max_steps,
                                  workers=self.config.eval_workers)
            report["checkpoint"] = self.ckpt_path  # the state evaluated is the one just saved there
            path = save_report(report, self._evaluation_path())
            self._kept.on_evaluation(self._policy_state(), report)  # best/ when it beats the best so far
            # the log keeps the summary; the file keeps every episode
            self._log({"step": self.step, "eval": {
                "mean_success": report["mean_success"], "file": os.path.basename(path),
                "per_task": {t: r["success_rate"] for t, r in report["per_task"].items()}}})
            dispatch(self.callbacks, "on_evaluation", self, report)
        self.dist.barrier()

    def _evaluation_path(self) -> str:
        return os.path.join(self.out, f"evaluation_step{self.step}.json")

    def _evaluation_missing(self) -> bool:
        """Whether this step is an evaluation step (every eval_every, and the last) whose report is not written."""
        cfg = self.config
        due = cfg.eval_every and self.step > 0 and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
        return bool(due) and not os.path.exists(self._evaluation_path())

    def _log(self, entry: dict) -> None:
        if not self.dist.main:
            return
        append_json_line(self.metrics_path, entry, TrainingError, default=_json_default)
        self._loggers.log(entry)
        dispatch(self.callbacks, "on_log", self, entry)

    def save(self) -> str:
        """Writes the checkpoint (every rank takes part). Refuses non-finite weights (DivergenceError) and names
        the file when it cannot be written (TrainingError); either way the previous checkpoint stays."""
        self._check_finite()
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            self._diverged(None, "the weights are not finite, so no checkpoint is written")
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rngs = self.dist.gather({"torch": torch.get_rng_state(), "cuda": cuda_rng})
        if self.dist.world > 1:
            self._check_ranks_in_sync()
        if not self.dist.main:
            self.dist.barrier()  # rank 0 has written it
            self._saved_step = self.step
            return self.ckpt_path
        state = replace(
            self._policy_state(), optimizer=self.optimizer.state_dict(), world_size=self.dist.world,
            sampler=self.sampler.state_dict(),  # one: every rank draws the same global batch (checked above)
            rng=rngs,  # one per rank (dropout)
            history=self.history, task_agreement=self.task_agreement)
        try:
            state.save(self.ckpt_path)
            self._kept.on_save(state)  # checkpoints/step_<N>/ when keep_checkpoints > 0
        except OSError as exc:  # atomic_write's: names the file, says when the disk is full
            raise TrainingError(f"checkpoint of step {self.step} not written: {exc}") from exc
        self._saved_step = self.step
        dispatch(self.callbacks, "on_checkpoint", self, self.ckpt_path)
        self.dist.barrier()
        return self.ckpt_path

    def _policy_state(self) -> RunState:
        """The run state without its resume part, from the live model (no copy of the weights)."""
        return RunState(
            config=self.config.to_dict(), model=self.model.state_dict(), step=self.step,
            tasks=list(self.sampler.tasks), state_mean=self.sampler.state_mean.float().cpu(),
            state_std=self.sampler.state_std.float().cpu(),
            eval_prompts=prompt_to_dict(self.sampler.eval_prompt()) if self.config.use_prompt else None,
            dataset_fingerprint=self.fingerprint, task_envs=self.task_envs,
            best_return=torch.tensor([self.sampler.best_return[t] for t in self.sampler.tasks], dtype=torch.float32))

    def _resume(self, state: RunState) -> None:
        state.check_resumable(self.config, self.fingerprint, self.ckpt_path)
        self.model.load_state_dict(state.model)
        method.load_optimizer_state(self.optimizer, state.optimizer)
        self.sampler.load_state_dict(state.sampler)
        # any process count: the ranks the checkpoint has continue their dropout streams, the others start theirs
        # from the seed (so a resume on more processes differs from an uninterrupted run by its dropout only)
        rank, rngs = self.dist.rank, state.rng
        if rank < len(rngs):
            torch.set_rng_state(rngs[rank]["torch"])
            if rngs[rank].get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rngs[rank]["cuda"], self.device)
        else:
            torch.manual_seed(self.dist.rank_seed(self.config.seed))
        self.step = self._saved_step = state.step
        self.history = list(state.history)
        self.task_agreement = state.task_agreement
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        if self.dist.main:
            run_folder.truncate_log(self.metrics_path, step)


_STOP_CHECK_EVERY = 10  # steps between the data-parallel "did a rank get a signal?" checks


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
