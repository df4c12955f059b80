"""hf.plan: the memory a run needs at its peak, before anything is allocated, and whether it fits the device.

    persistent   parameters, gradients, AdamW state (fp32), packed task masks, the entries no task uses
                 (bool, mixed schedule), and the dataset's copy when its size is given
    training     max(forward + backward: the batch's saved tensors and backward temporaries, the autocast
    step         weight copies, the round-robin frozen mask; optimiser step: the frozen weights' copies and
                 AdamW's temporaries)
    mask update  G x P_masked x 4 per-task gradient rows (micro-batches of G tasks), the float64 harmony
                 gradient when G < T, the activations of G x batch_per_task sequences, the candidate heaps
    peak         persistent + max(training step, mask update)

Shapes come from a model built on the meta device (nothing allocated); the per-sequence counts are
harmodt_fast/activation_memory.py. The formulas, assumptions and the measured accuracy: docs/plan.md.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import torch

from harmodt_fast.activation_memory import attention_path, backward_temporary_bytes, sequence_bytes
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.masks import erk_densities, masked_weight_shapes
from harmodt_fast.ops.harmony import score_needs_weight
from harmodt_fast.ops.packing import words_for
from harmodt_fast.runtime import autocast_dtype, pick_device
from harmodt_fast.task_gradients import AGREEMENT_ENTRIES, update_group_size
from harmodt_fast.tasks import task_names

GIB = 2**30
MIB = 2**20
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


def parse_bytes(value) -> int:
    """139GiB, "24GB", "512MiB", "1.5 TiB" or a number of bytes -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a memory size: {value!r} (e.g. 139GiB, 24GB, 512MiB or bytes)")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size must be > 0, got {value!r}")
    return size


def device_memory_bytes(device: torch.device) -> int | None:
    """What a run may use on `device`: a GPU's total memory; on the CPU, MemAvailable (else the total RAM).
    None for a CUDA device this machine does not have (planning a GPU run elsewhere: pass device_memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1]) if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class MemoryPlan:
    """Bytes a run needs, by part. `fits` is None when the device's memory is unknown."""

    preset: str
    method: str
    device: str
    precision: str
    attention: str  # the attention path the activations assume (harmodt_fast/activation_memory.py)
    num_tasks: int
    batch_per_task: int
    schedule: str
    sequences_per_step: int
    tokens_per_sequence: int
    parameters: int
    masked_weights: int
    sequence_bytes: int  # saved tensors + backward temporaries of one sequence
    persistent: dict[str, int]
    step: dict[str, int]  # forward + backward, on top of the persistent parts
    optimizer_step: dict[str, int]  # the optimiser step, after the activations are freed
    mask_update: dict[str, int]  # empty without masks
    mask_update_group: int | None  # G: tasks per micro-batch of the mask update's per-task gradients
    device_memory: int | None
    max_batch_per_task: int | None  # the largest batch_per_task whose peak fits device_memory (0: none)
    notes: list[str] = field(default_factory=list)

    @property
    def persistent_bytes(self) -> int:
        return sum(self.persistent.values())

    @property
    def step_bytes(self) -> int:
        return max(sum(self.step.values()), sum(self.optimizer_step.values()))

    @property
    def mask_update_bytes(self) -> int:
        return sum(self.mask_update.values())

    @property
    def peak_bytes(self) -> int:
        return self.persistent_bytes + max(self.step_bytes, self.mask_update_bytes)

    @property
    def peak_phase(self) -> str:
        return "mask update" if self.mask_update_bytes > self.step_bytes else "training step"

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak_bytes <= self.device_memory

    @property
    def shortfall(self) -> int:
        """Bytes missing (0 when it fits or the device's memory is unknown)."""
        return 0 if self.device_memory is None else max(0, self.peak_bytes - self.device_memory)

    def biggest_parts(self, n: int = 3) -> list[tuple[str, int]]:
        phase = self.mask_update if self.peak_phase == "mask update" else (
            self.step if sum(self.step.values()) >= sum(self.optimizer_step.values()) else self.optimizer_step)
        return sorted({**self.persistent, **phase}.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(persistent_bytes=self.persistent_bytes, step_bytes=self.step_bytes,
                 mask_update_bytes=self.mask_update_bytes, peak_bytes=self.peak_bytes, peak_phase=self.peak_phase,
                 fits=self.fits, shortfall=self.shortfall)
        return d

    def refusal(self) -> str:
        """The message of a run that does not fit: needed vs available, the biggest parts, what would fit."""
        section = "update" if self.peak_phase == "mask update" else "step"
        parts = ", ".join(f"{self._label(name, section)} {_gib(b)}" for name, b in self.biggest_parts())
        if self.max_batch_per_task:
            fix = f"batch_per_task={self.max_batch_per_task} fits (this run asks for {self.batch_per_task})"
        else:
            fix = "no batch_per_task fits: fewer tasks, a smaller model or a bigger device"
        return (f"this run needs about {_gib(self.peak_bytes)} at its peak ({self.peak_phase}) but {self.device} "
                f"has {_gib(self.device_memory)}: short by {_gib(self.shortfall)}; biggest parts: {parts}; {fix}. "
                f"hf.plan(...) or `harmodt-fast plan` shows every part; train(..., check_memory=False) runs anyway")

    def _label(self, key: str, section: str) -> str:
        G, Pm = self.mask_update_group, self.masked_weights
        labels = {
            "parameters": "parameters (fp32)", "gradients": "gradients (fp32)",
            "optimizer_state": "AdamW state (2 x fp32)", "task_masks": "task masks (1 bit per masked weight per task)",
            "unused_entry_masks": "entries no task uses (bool)", "dataset": "dataset copy (fp32)",
            "autocast_weight_copies": "autocast weight copies (bf16)",
            "frozen_entry_mask": "the step's task's frozen entries (bool)",
            "adamw_temporaries": "AdamW temporaries", "frozen_weight_copies": "frozen weights' copies (fp32)",
            "task_gradient_rows": f"per-task gradient rows ({G} x {Pm:,} x fp32)",
            "harmony_gradient": "harmony gradient (float64)", "candidate_heaps": "candidate heaps",
            "mask_copies": "copies of the packed masks", "agreement_sample": "task-agreement sample (fp32)",
            "weight_copy": "flat masked weights (fp32)",
        }
        if key == "activations":
            seqs = self.sequences_per_step if section == "step" else G * self.batch_per_task
            return f"activations ({seqs} sequences x {self.sequence_bytes / MIB:.2f} MiB)"
        return labels.get(key, key)

    def __str__(self) -> str:
        title = [f"memory plan: {self.preset} preset, {self.method}, {self.num_tasks} tasks x {self.batch_per_task} "
                 f"sequences ({self.schedule}: {self.sequences_per_step} per step, {self.tokens_per_sequence} "
                 f"tokens each)",
                 f"{self.device}, {self.precision}, attention {self.attention}, {self.parameters:,} parameters "
                 f"({self.masked_weights:,} masked)"]
        rows = [(self._label(k, "persistent"), b) for k, b in self.persistent.items()]
        rows += [("= persistent", self.persistent_bytes)]
        rows += [("step: " + self._label(k, "step"), b) for k, b in self.step.items()]
        rows += [("optimiser step: " + self._label(k, "optimizer"), b) for k, b in self.optimizer_step.items()]
        rows += [("= training step (the larger of the two)", self.step_bytes)]
        if self.mask_update:
            rows += [("mask update: " + self._label(k, "update"), b) for k, b in self.mask_update.items()]
            rows += [(f"= mask update (G = {self.mask_update_group} of {self.num_tasks} tasks per micro-batch)",
                      self.mask_update_bytes)]
        rows += [(f"PEAK (persistent + {self.peak_phase})", self.peak_bytes)]
        if self.device_memory is not None:
            rows += [("device memory", self.device_memory)]
        width = max(len(name) for name, _ in rows) + 2
        lines = title + [f"{'':{width}s}{'GiB':>10s}{'MiB':>12s}"]
        lines += [f"{name:{width}s}{b / GIB:10.2f}{b / MIB:12.1f}" for name, b in rows]
        if self.fits is None:
            lines.append("fits: unknown (no device memory given)")
        elif self.fits:
            lines.append(f"fits: yes, {_gib(self.device_memory - self.peak_bytes)} to spare")
        else:
            lines.append(f"fits: NO, short by {_gib(self.shortfall)}")
        if self.max_batch_per_task is not None:
            lines.append(f"largest batch_per_task that fits: {self.max_batch_per_task}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gib(b) -> str:
    return "unknown" if b is None else f"{b / GIB:.2f} GiB"


@dataclass(frozen=True)
class _ModelShapes:
    parameters: int
    largest_parameter: int
    masked: dict[str, tuple[int, ...]]
    autocast_cast: int  # elements of the weights whose autocast copies backward keeps


def _model_shapes(config: HarmoDTConfig) -> _ModelShapes:
    """The model's sizes from its shapes-only build (model.meta_model: no memory, no masks drawn)."""
    from harmodt_fast.model import meta_model

    model = meta_model(config)
    # autocast's weight copies that backward keeps: of the Linears whose input needs a gradient (the blocks' and
    # the action head's; the embeddings' inputs are data)
    cast = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(("blocks.", "predict_action")))
    return _ModelShapes(model.num_parameters(), max(p.numel() for p in model.parameters()),
                        masked_weight_shapes(model), cast)


def plan_config(config: HarmoDTConfig, device="auto", device_memory=None, transitions: int | None = None,
                preset: str = "custom") -> MemoryPlan:
    """The MemoryPlan of a run of `config` on `device` (see `plan` for the arguments)."""
    dev = pick_device(device) if str(device) == "auto" else torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"plan: devices are 'cpu' or 'cuda', got {dev}")
    memory = parse_bytes(device_memory) if device_memory is not None else device_memory_bytes(dev)
    shapes = _model_shapes(config)
    c, T, bpt = config, config.num_tasks, config.batch_per_task
    amp = autocast_dtype(c, dev)
    a = 2 if amp is not None else 4
    path = attention_path(c, dev.type)
    per_seq = sum(sequence_bytes(c, dev.type, a).values()) + backward_temporary_bytes(c, dev.type, a)
    P, Pm = shapes.parameters, sum(math.prod(s) for s in shapes.masked.values())
    masked = Pm if c.use_masks else 0
    mixed = c.schedule == "mixed"
    seqs = bpt * (T if mixed else 1)

    # entries no task uses: a mixed step keeps a bool mask of them per layer that has any (expected count >= 1)
    unused = 0
    if c.use_masks and mixed:
        density = erk_densities(shapes.masked, c.density)
        unused = sum(math.prod(s) for n, s in shapes.masked.items() if math.prod(s) * (1 - density[n]) ** T >= 1)
    persistent = {"parameters": 4 * P, "gradients": 4 * P, "optimizer_state": 8 * P}
    if c.use_masks:
        persistent["task_masks"] = T * sum(4 * words_for(math.prod(s)) for s in shapes.masked.values())
    if unused:
        persistent["unused_entry_masks"] = unused
    if transitions:
        persistent["dataset"] = int(transitions) * (c.state_dim + c.act_dim + 1) * 4

    copies = shapes.autocast_cast * a if amp is not None else 0
    step = {"activations": seqs * per_seq}
    if copies:
        step["autocast_weight_copies"] = copies
    if c.use_masks and not mixed:
        step["frozen_entry_mask"] = masked
    frozen = masked if not mixed else unused
    # foreach AdamW (CUDA) takes a temporary of every parameter at once, the single-tensor one (CPU) two of one
    optimizer_step = {"adamw_temporaries": 4 * P if dev.type == "cuda" else 8 * shapes.largest_parameter}
    if frozen:
        optimizer_step["frozen_weight_copies"] = 4 * frozen

    update, group = {}, None
    if c.updates_masks:
        # "auto" (mask_update_memory_mb None) on CUDA: what is free at an update, the persistent part aside
        free = memory - sum(persistent.values()) if dev.type == "cuda" and memory is not None else None
        group = update_group_size(c, Pm, free)
        k_max = max(c.eta_max, c.eta_min, math.ceil(c.flip_fraction * c.density * Pm))
        threads = torch.get_num_threads() if dev.type == "cpu" else 1
        # method.mask_update: G tasks' rows, ḡ, the flat copy of the masks the selection reads (the flips go into
        # the layers' masks in place), the flat weights for a score that reads them, and the agreement sample
        # when the rows are not kept (G < T)
        update = {"task_gradient_rows": group * Pm * 4, "harmony_gradient": Pm * 8,
                  "mask_copies": persistent["task_masks"]}
        if score_needs_weight(c.score):
            update["weight_copy"] = Pm * 4
        if group < T:
            update["agreement_sample"] = T * min(Pm, AGREEMENT_ENTRIES) * 4
        update["activations"] = group * bpt * per_seq
        if copies:
            update["autocast_weight_copies"] = copies
        update["candidate_heaps"] = T * 2 * k_max * 16 * threads

    notes = []
    if dev.type == "cuda":
        notes.append("not counted: the CUDA context and library workspaces, and the caching allocator's "
                     "fragmentation (keep some headroom)")
    else:
        notes.append("CPU: glibc's malloc keeps freed blocks resident; with its default settings the peak RSS "
                     "measured 1.3-1.5x this plan (docs/plan.md)")
    if not transitions:
        notes.append("the dataset's copy is not counted (pass transitions= to count it)")
    if c.updates_masks and c.mask_update_memory_mb is None and dev.type == "cuda" and memory is None:
        notes.append("mask_update_memory_mb is auto but the device's memory is unknown: G assumes 256 MB of rows")

    result = MemoryPlan(
        preset=preset, method=c.method, device=str(dev), precision="bf16" if amp is not None else "fp32",
        attention=path, num_tasks=T, batch_per_task=bpt, schedule=c.schedule, sequences_per_step=seqs,
        tokens_per_sequence=c.tokens_per_sequence, parameters=P, masked_weights=Pm, sequence_bytes=per_seq,
        persistent=persistent, step=step, optimizer_step=optimizer_step, mask_update=update,
        mask_update_group=group, device_memory=memory, max_batch_per_task=None, notes=notes)
    if memory is not None:
        result.max_batch_per_task = _largest_batch(result, T if mixed else 1)
    return result


def _largest_batch(p: MemoryPlan, seqs_per_batch_unit: int) -> int:
    """Every phase is a + b * batch_per_task bytes: the largest batch_per_task with every phase under the memory."""
    room = p.device_memory - p.persistent_bytes
    per = p.sequence_bytes
    fixed_step = sum(p.step.values()) - p.sequences_per_step * per
    phases = [(fixed_step, seqs_per_batch_unit * per), (sum(p.optimizer_step.values()), 0)]
    if p.mask_update:
        group_seqs = p.mask_update_group * p.batch_per_task
        phases.append((p.mask_update_bytes - group_seqs * per, p.mask_update_group * per))
    best = None
    for fixed, slope in phases:
        if fixed > room:
            return 0
        if slope:
            fit = (room - fixed) // slope
            best = fit if best is None else min(best, fit)
    return max(0, int(best))


def plan(preset: str = "paper", tasks=50, batch_per_task: int | None = None, device_memory=None,
         device: str = "auto", *, transitions: int | None = None, **overrides) -> MemoryPlan:
    """The memory plan of a run: bytes by part, the peak, whether it fits and the largest batch_per_task that does.

    tasks: a number of tasks, a task set ("MT50") or names (list or comma string); batch_per_task: default the
    preset's; device_memory: bytes or "139GiB" / "24GB" / "512MiB" (default: the device's, see
    device_memory_bytes); device: "auto", "cpu" or "cuda" (a GPU may be planned on a machine without one);
    transitions: the dataset's transitions, to count its copy; overrides: HarmoDTConfig fields by name.
    """
    if "tasks" in overrides or "num_tasks" in overrides:
        raise ValueError("plan: give the tasks as the `tasks` argument (a count or names), not as an override")
    if isinstance(tasks, bool) or tasks is None:
        raise ValueError(f"plan: tasks must be a count or task names, got {tasks!r}")
    if isinstance(tasks, int) or (isinstance(tasks, str) and tasks.strip().isdigit()):
        overrides["num_tasks"] = int(tasks)
    else:
        overrides["tasks"] = tuple(task_names(tasks))
    if batch_per_task is not None:
        overrides["batch_per_task"] = int(batch_per_task)
    config = HarmoDTConfig.from_preset(preset, **overrides)  # unknown preset / field / value -> ValueError
    return plan_config(config, device, device_memory, transitions, preset=preset)


def refuse_if_over_memory(config: HarmoDTConfig, device, device_memory=None) -> MemoryPlan:
    """Raises ValueError (MemoryPlan.refusal) when the run's planned peak exceeds the device's memory."""
    result = plan_config(config, device, device_memory)
    if result.fits is False:
        raise ValueError(result.refusal())
    return result
