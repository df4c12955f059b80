"""The run's state on disk: one owner, RunState (what a checkpoint holds, how it is written, read, checked, migrated
from older formats and matched against a run that wants to resume it).

A checkpoint file is RunState.to_dict() saved with torch.save, written atomically (temporary file in the same
folder, fsync, rename):
    "format":        CHECKPOINT_FORMAT
    "config":        HarmoDTConfig.to_dict()
    "model":         the model's state dict (the packed task masks are buffers in it)
    "step":          optimisation steps done
    "tasks":         task names, in model task-id order
    "state_mean", "state_std":  float32 [T, state_dim] per-task state normalisation
    "eval_prompts":  {field: tensor [T, prompt_len, ...]} one prompt per task (fields of hf.Prompt), or None
    "dataset_fingerprint": str identifying the training data
    "task_envs":     {task: gymnasium EnvSpec JSON} for tasks without a Meta-World name
and what resuming needs ("optimizer", "sampler", "rng", "history", "task_agreement", "world_size"; the learning
rate is a function of the step, so there is no scheduler state).

Reading never runs code: torch.load(weights_only=True) only rebuilds tensors and plain containers, so a file that
needs anything else (a crafted pickle) is refused before any of it executes. Older formats are migrated as they are
read (_MIGRATIONS, keyed by the format they upgrade). Every reader checks what it read before building anything
from it (check_consistent; the resume part in check_resumable): a bad file is a CheckpointError naming it.

An export (`export(run, folder)`) is the pickle-free form for sharing a trained policy: `config.json` (the config,
task names, step), `model.safetensors` (the state dict, packed masks included) and `tasks.safetensors` (per-task
state normalisation and prompts). `read_run` turns either form into a RunState (an export's has no resume part).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass, field, fields

import torch

from harmodt_fast._io import atomic_write, read_json_format
from harmodt_fast.batch import Prompt

CHECKPOINT_FORMAT = "harmodt_fast/2"
CHECKPOINT_NAME = "checkpoint.pt"
EXPORT_FORMAT = "harmodt_fast-export/2"
EXPORT_FILES = ("config.json", "model.safetensors", "tasks.safetensors")
# each export format holds the model of the checkpoint format of the same number (read_export migrates alike)
_EXPORT_TO_CHECKPOINT_FORMAT = {"harmodt_fast-export/1": "harmodt_fast/1", EXPORT_FORMAT: CHECKPOINT_FORMAT}
_REQUIRED = ("config", "model", "tasks", "state_mean", "state_std")
# config fields that only change logging, not the training trajectory: a resumed run may change them
# (the backend and compile too: they compute the same step, to rounding)
NON_TRAJECTORY_FIELDS = frozenset({"log_every", "checkpoint_every", "eval_every", "eval_episodes", "eval_max_steps",
                                   "eval_workers", "logger", "tensorboard", "extra", "backend", "compile"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the run asking for it."""


@dataclass
class RunState:
    """What a checkpoint holds (the module docstring lists the fields). The resume part (optimizer ... world_size)
    is None where the source lacks it: an export, or a checkpoint written by hand for evaluation."""

    config: dict  # HarmoDTConfig.to_dict() as written (harmodt_config() builds the config)
    model: dict[str, torch.Tensor]
    tasks: list[str]
    state_mean: torch.Tensor
    state_std: torch.Tensor
    step: int = 0
    eval_prompts: dict[str, torch.Tensor] | None = None
    dataset_fingerprint: str | None = None
    task_envs: dict[str, str] = field(default_factory=dict)
    optimizer: dict | None = None
    sampler: dict | None = None
    rng: list[dict] | None = None  # one {"torch", "cuda"} per rank (dropout streams)
    history: list[dict] = field(default_factory=list)
    task_agreement: torch.Tensor | None = None
    world_size: int | None = None

    # ---- the file's dict ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, d: dict, name: str = "checkpoint dict", warn_resume: bool = False) -> "RunState":
        """A checkpoint dict of this or an older format (migrated; a dict without "format" counts as this one).
        warn_resume: warn about what a migration changes for a run that resumes from it (the trainer's rank 0)."""
        fmt = d.get("format", CHECKPOINT_FORMAT)
        while fmt != CHECKPOINT_FORMAT:
            if not isinstance(fmt, str) or fmt not in _MIGRATIONS:
                raise CheckpointError(f"{name}: not a harmodt_fast checkpoint (format {fmt!r})")
            d = _MIGRATIONS[fmt](d, name, warn_resume)
            fmt = d["format"]
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise CheckpointError(f"{name}: checkpoint lacks {missing}")
        state = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        _check_field_types(state, name)
        state.tasks, state.task_envs = list(state.tasks), dict(state.task_envs or {})
        return state

    def save(self, path: str) -> str:
        """Writes the checkpoint file atomically (a run killed mid-write keeps the previous one); returns path."""
        return save_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str, map_location="cpu", warn_resume: bool = False) -> "RunState":
        """A checkpoint file, or the checkpoint inside a run folder; CheckpointError names what is wrong."""
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_NAME)
        return cls.from_dict(_read_file(path, map_location), path, warn_resume)

    # ---- reading it -----------------------------------------------------------------------------------------------
    def harmodt_config(self):
        """The HarmoDTConfig of `config`."""
        from harmodt_fast.config import HarmoDTConfig

        return HarmoDTConfig.from_dict(self.config)

    # ---- resuming -------------------------------------------------------------------------------------------------
    def check_resumable(self, config, fingerprint: str, name: str) -> None:
        """Refuses (CheckpointError) to resume this state in a run of `config` on data `fingerprint`: the config may
        differ only in NON_TRAJECTORY_FIELDS (a field the checkpoint lacks, added since, counts as its default)."""
        check_consistent(self, name)  # a broken file is named as broken, whatever else differs
        mine, theirs = config.to_dict(), {**_config_defaults(), **dict(self.config)}
        diff = sorted(k for k in mine if k not in NON_TRAJECTORY_FIELDS and mine[k] != theirs.get(k))
        if diff:
            details = ", ".join(f"{k}: {theirs.get(k)!r} there vs {mine[k]!r} now" for k in diff[:6])
            raise CheckpointError(f"{name} belongs to a run with another config ({details}); "
                                  f"use another output folder (it was not overwritten)")
        if self.dataset_fingerprint != fingerprint:
            raise CheckpointError(f"{name} was trained on other data (fingerprint {self.dataset_fingerprint} vs "
                                  f"{fingerprint}); use another output folder (it was not overwritten)")
        lacking = [k for k in ("optimizer", "sampler", "rng") if getattr(self, k) is None]
        if lacking:
            raise CheckpointError(f"{name} holds no resume state ({', '.join(lacking)} missing: an export or a "
                                  f"policy-only checkpoint); use another output folder (it was not overwritten)")
        _check_resume_part(self, name)


def _config_defaults() -> dict:
    from harmodt_fast.config import HarmoDTConfig

    return {f.name: f.default for f in fields(HarmoDTConfig) if f.default is not dataclasses.MISSING}


# ---- older formats ----------------------------------------------------------------------------------------------
_REMOVED_HEADS = ("predict_state.", "predict_return.")


def _from_format_1(d: dict, name: str, warn_resume: bool) -> dict:
    """Format 1 -> 2. The model had two heads the action loss never trained (predict_state, predict_return): their
    weights are dropped. Early format-1 files hold a list of sampler states, one per rank, each rank having drawn
    its own batch_per_task rows per task; batch_per_task is now the global batch, so such a run continues from
    rank 0's sampler with a global batch world_size times smaller."""
    model = {k: v for k, v in d["model"].items() if not str(k).startswith(_REMOVED_HEADS)} if isinstance(
        d.get("model"), dict) else d.get("model")
    sampler = d.get("sampler")
    if isinstance(sampler, list):
        if len(sampler) > 1 and warn_resume:
            warnings.warn(f"{name} was written by {len(sampler)} processes that each drew their own "
                          f"batch_per_task rows per task (an older version); batch_per_task now means the global "
                          f"batch, so this run continues from rank 0's sampler with {len(sampler)}x fewer rows per "
                          f"step than before", stacklevel=4)
        sampler = sampler[0] if sampler else None
    migrated = {**d, "format": "harmodt_fast/2", "sampler": sampler}
    if model is not None:
        migrated["model"] = model
    return migrated


_MIGRATIONS = {"harmodt_fast/1": _from_format_1}  # format -> a function giving the next format's dict


# ---- files ----------------------------------------------------------------------------------------------------------
def save_atomic(obj, path: str) -> str:
    """torch.save to `path` without ever leaving a partial file there: a killed run keeps the previous one."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _read_file(path: str, map_location="cpu") -> dict:
    """The dict of a checkpoint file, read with weights_only (a file that would run code is refused)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the offending global ("Unsupported global: GLOBAL posix.system ..."); keep only that part
        what = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        what = what[what.find("GLOBAL"):].split(" was not")[0].rstrip(".") if what else "an object that is not a tensor"
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain containers "
                              f"({what}), and loading them would run code from the file; nothing was loaded") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, *_MIGRATIONS):
        what = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a harmodt_fast checkpoint (format {what!r})")
    return ckpt


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The dict of a checkpoint file (or a run folder's), in the current format: RunState.load(path).to_dict(),
    for code that inspects or edits the file's dict."""
    return RunState.load(path, map_location).to_dict()


def prompt_to_dict(prompt: Prompt | None) -> dict | None:
    return None if prompt is None else {f.name: getattr(prompt, f.name).cpu() for f in fields(Prompt)}


def prompt_from_dict(d: dict | None) -> Prompt | None:
    return None if d is None else Prompt(**d)


def model_from_checkpoint(run: "RunState | dict", device="cpu"):
    """(model in eval mode, config) from a RunState or a checkpoint dict."""
    from harmodt_fast.model import HarmoDT

    state = run if isinstance(run, RunState) else RunState.from_dict(run)
    check_consistent(state, "run state")  # before building: names, shapes, dtypes, values
    config = state.harmodt_config()
    model = HarmoDT(config)
    model.load_state_dict(state.model)
    return model.to(device).eval(), config


# ---- reading any run form, checked ----------------------------------------------------------------------------------
def read_run(source) -> tuple[RunState, str]:
    """(RunState, a name for messages) from a checkpoint file, a run folder, an export folder, an object with a
    `.checkpoint` path (hf.train's result), a loaded checkpoint dict or a RunState; checks that its parts agree."""
    if isinstance(source, RunState):
        state, name = source, "run state"
    elif isinstance(source, dict):
        state, name = RunState.from_dict(source), "checkpoint dict"
    else:
        path = getattr(source, "checkpoint", source)
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"expected a checkpoint path, a run or export folder, a TrainResult, a checkpoint "
                             f"dict or a RunState, got {type(source).__name__}")
        name = os.fspath(path)
        is_export = os.path.isdir(name) and not os.path.isfile(os.path.join(name, CHECKPOINT_NAME)) and any(
            os.path.isfile(os.path.join(name, f)) for f in EXPORT_FILES)
        state = read_export(name) if is_export else RunState.load(name)
    check_consistent(state, name)
    return state, name


def check_consistent(state: RunState, name: str) -> None:
    """The one check of a run state before any model is built from it (CheckpointError naming the file and field or
    tensor): the config passes HarmoDTConfig's checks; tasks, statistics, prompts and the model's tensors (names,
    shapes, dtypes) are those of the config's model; every storage holds its shape (a crafted stride-0 view is
    never materialised); every float is finite, every std > 0, every task's mask keeps a weight."""
    _check_field_types(state, name)
    tensors = {f"model[{k!r}]": v for k, v in state.model.items()}
    tensors.update({f"eval_prompts[{k!r}]": v for k, v in (state.eval_prompts or {}).items()})
    tensors.update({k: getattr(state, k) for k in ("state_mean", "state_std", "task_agreement")
                    if getattr(state, k) is not None})
    for what, t in tensors.items():  # before anything reads the values
        _check_storage(t, f"{name}: {what}")
    try:
        config = state.harmodt_config()
    except ValueError as exc:
        raise CheckpointError(f"{name}: config: {exc}") from None
    tasks, T, S = list(state.tasks), len(state.tasks), config.state_dim
    problems = []
    if state.config.get("num_tasks") != T:
        problems.append(f"config.num_tasks is {state.config.get('num_tasks')} but the task list has {T} names")
    if state.config.get("tasks") is not None and list(state.config["tasks"]) != tasks:
        problems.append(f"config.tasks {list(state.config['tasks'])} differs from the task list {tasks}")
    floats, ints = (torch.float32, torch.float64, torch.bfloat16, torch.float16), (torch.int64, torch.int32)
    for key in ("state_mean", "state_std"):
        if tuple(getattr(state, key).shape) != (T, S) or getattr(state, key).dtype not in floats:
            problems.append(f"{key} has shape {tuple(getattr(state, key).shape)} ({getattr(state, key).dtype}), "
                            f"expected ({T}, {S}) of floats")
    prompts, Kp = state.eval_prompts, config.prompt_len  # None: acts on unseen tasks only (policy.py says so)
    want = {"states": ((T, Kp, S), floats), "actions": ((T, Kp, config.act_dim), floats),
            "returns_to_go": ((T, Kp, 1), floats), "timesteps": ((T, Kp), ints), "attention_mask": ((T, Kp), (
                torch.bool, *ints, *floats))}
    for f, (shape, dtypes) in want.items() if prompts is not None else ():
        got = prompts.get(f)
        if got is None or tuple(got.shape) != shape or got.dtype not in dtypes:
            what = f"{tuple(got.shape)} {got.dtype}" if got is not None else "missing"
            problems.append(f"eval_prompts[{f!r}] is {what}, expected {shape} of {dtypes[0]}")
        elif f == "timesteps" and not bool(((got >= 0) & (got < config.max_ep_len)).all()):
            problems.append(f"eval_prompts['timesteps'] holds steps outside 0..{config.max_ep_len - 1}")
    if problems:
        raise CheckpointError(f"{name}: inconsistent checkpoint: " + "; ".join(problems))
    _check_model(state.model, config, tasks, name)
    for what, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name}: {what} holds non-finite values (NaN or Inf)")
    if bool((state.state_std <= 0).any()):
        bad = [tasks[i] for i in (state.state_std <= 0).any(1).nonzero().flatten().tolist()]
        raise CheckpointError(f"{name}: state_std has entries <= 0 for task(s) {bad}")


# field -> the types it may hold (the optional ones may be None, RunState's defaults)
_FIELD_TYPES = {"config": dict, "model": dict, "tasks": (list, tuple), "state_mean": torch.Tensor, "state_std":
                torch.Tensor, "step": int, "eval_prompts": dict, "dataset_fingerprint": str, "task_envs": dict,
                "optimizer": dict, "sampler": dict, "rng": list, "history": list, "task_agreement": torch.Tensor,
                "world_size": int}


def _check_field_types(state: RunState, name: str) -> None:
    """CheckpointError naming the first field of `state` that holds the wrong type."""
    for key, kinds in _FIELD_TYPES.items():
        value = getattr(state, key)
        if (value is not None or key in _REQUIRED) and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CheckpointError(f"{name}: {key} is a {type(value).__name__}, expected "
                                  f"{getattr(kinds, '__name__', 'list')}")
    if state.step < 0 or (state.world_size is not None and state.world_size < 1):
        raise CheckpointError(f"{name}: step ({state.step}) must be >= 0 and world_size ({state.world_size}) >= 1")
    tasks = list(state.tasks)
    if not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
        raise CheckpointError(f"{name}: tasks must be distinct non-empty names, got {tasks!r}")
    for key in ("model", "eval_prompts"):
        for k, v in (getattr(state, key) or {}).items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{name}: {key}[{k!r}] is a {type(v).__name__}, expected a tensor")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (state.task_envs or {}).items()):
        raise CheckpointError(f"{name}: task_envs must map task names to EnvSpec JSON strings")


def _check_storage(t: torch.Tensor, what: str) -> None:
    """Refuses a tensor whose storage is smaller than its shape (a crafted stride-0 view): materialising it would
    allocate far more than the file holds."""
    if t.layout != torch.strided or t.is_meta:
        raise CheckpointError(f"{what}: a {t.layout} {t.device.type} tensor, expected a dense one")
    if t.numel() and t.untyped_storage().nbytes() < t.numel() * t.element_size():
        raise CheckpointError(f"{what}: shape {tuple(t.shape)} needs {t.numel() * t.element_size()} bytes but its "
                              f"storage holds {t.untyped_storage().nbytes()} (a crafted view); refused")


def _expected_model(config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{name: (shape, is_mask)} of the state dict of HarmoDT(config), built on the meta device (nothing allocated,
    no masks drawn: the packed masks' shapes follow from the masked weights)."""
    from harmodt_fast.model import HarmoDT
    from harmodt_fast.ops.packing import words_for

    with torch.device("meta"), _SkipInit():
        model = HarmoDT(dataclasses.replace(config, method="prompt-dt") if config.use_masks else config)
    expected = {k: (tuple(v.shape), False) for k, v in model.state_dict().items()}
    if config.use_masks:
        for weight, layer in model.masked_layers().items():
            expected[weight.removesuffix("weight") + "masks_packed"] = (
                (config.num_tasks, words_for(layer.weight.numel())), True)
    return expected


class _SkipInit(torch.overrides.TorchFunctionMode):
    """No random initialisers on meta tensors (no values to fill; the first normal_ there imports for seconds)."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensor = args[0] if args else (kwargs or {}).get("tensor")  # torch.nn.init passes it by keyword
        if getattr(func, "__name__", "") in ("normal_", "uniform_") and getattr(tensor, "is_meta", False):
            return tensor
        return func(*args, **(kwargs or {}))


def _check_model(model: dict, config, tasks: list[str], name: str) -> None:
    """The model state dict holds exactly the tensors of the config's model: names, shapes, float parameters,
    int32 masks, each task's mask non-empty (values are checked for finiteness by check_consistent)."""
    blocks = len({k.split(".")[1] for k in model if k.startswith("blocks.")})
    if blocks != config.layers:  # before building even on meta: its cost grows with the layers a config claims
        raise CheckpointError(f"{name}: config.layers is {config.layers} but the model holds {blocks} blocks")
    expected = _expected_model(config)
    missing, unexpected = sorted(set(expected) - set(model)), sorted(set(model) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{name}: model tensors differ from its config's model ({len(missing)} missing "
                              f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]})")
    kept = torch.zeros(len(tasks), dtype=torch.bool)
    for key, (shape, is_mask) in expected.items():
        t = model[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name}: model[{key!r}] has shape {tuple(t.shape)}, expected {shape}")
        if (t.dtype != torch.int32) if is_mask else not t.is_floating_point():
            raise CheckpointError(f"{name}: model[{key!r}] has dtype {t.dtype}, expected "
                                  f"{'torch.int32 (packed masks)' if is_mask else 'a float dtype'}")
        if is_mask:
            kept |= (t != 0).any(1).cpu()
    if config.use_masks and not bool(kept.all()):
        empty = [tasks[i] for i in (~kept).nonzero().flatten().tolist()]
        raise CheckpointError(f"{name}: the masks of task(s) {empty} keep no weight (all zero)")


def _check_resume_part(state: RunState, name: str) -> None:
    """The optimiser state matches the model's parameters (AdamW moments of their shapes, finite), and the RNG
    states are torch generator states: CheckpointError naming what does not."""
    # the state dict lists the parameters in parameters() order (its only buffers are the masks)
    shapes = [shape for shape, is_mask in _expected_model(state.harmodt_config()).values() if not is_mask]
    opt = state.optimizer
    groups = opt.get("param_groups")
    if not isinstance(opt.get("state"), dict) or not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{name}: optimizer is not an optimizer state (needs 'state' and 'param_groups')")
    ids = [i for g in groups for i in g["params"]]
    if not all(isinstance(i, int) for i in ids) or sorted(ids) != list(range(len(shapes))):
        raise CheckpointError(f"{name}: optimizer covers {sum(len(g['params']) for g in groups)} parameters, the "
                              f"model has {len(shapes)}")
    bad = sorted({k for g in groups for k, v in g.items() if isinstance(v, float) and not math.isfinite(v)})
    if bad:
        raise CheckpointError(f"{name}: optimizer param_groups hold non-finite {bad}")
    for i, entry in opt["state"].items():
        if not isinstance(entry, dict) or not isinstance(i, int) or i not in range(len(shapes)):
            raise CheckpointError(f"{name}: optimizer state has an entry {i!r} for no parameter")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            t = entry.get(key)
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{name}: optimizer state[{i}] lacks the tensor {key!r}")
            _check_storage(t, f"{name}: optimizer state[{i}][{key!r}]")
            if key != "step" and tuple(t.shape) != shapes[i]:
                raise CheckpointError(f"{name}: optimizer state[{i}][{key!r}] has shape {tuple(t.shape)}, the "
                                      f"parameter has {shapes[i]}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{name}: optimizer state[{i}][{key!r}] is not finite floats")
    rng_size = torch.get_rng_state().shape
    for r, rng in enumerate(state.rng or [None]):
        t = rng.get("torch") if isinstance(rng, dict) else None
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != rng_size:
            raise CheckpointError(f"{name}: rng[{r}] holds no torch generator state (a uint8 tensor of {rng_size[0]})")
    if not isinstance(state.sampler.get("generator"), torch.Tensor):
        raise CheckpointError(f"{name}: the sampler state has no 'generator' tensor")


# ---- export: config.json + safetensors, no pickle -------------------------------------------------------------------
def export(run, folder) -> str:
    """Writes the policy of a run (checkpoint file, run folder, TrainResult, dict or RunState), checked first, to
    `folder` as config.json, model.safetensors (weights and packed masks) and tasks.safetensors (per-task
    normalisation and prompts), read by hf.load_policy / hf.evaluate without pickle; returns the folder. config.json
    goes last with the others' sha256 (an old one first removed): readers see a whole export or an error."""
    from safetensors.torch import save

    state, _ = read_run(run)
    folder = os.path.abspath(os.fspath(folder))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.model.items()}
    per_task = {"state_mean": state.state_mean.float().contiguous(), "state_std": state.state_std.float().contiguous()}
    for f, v in (state.eval_prompts or {}).items():
        per_task[f"prompt.{f}"] = v.cpu().contiguous()
    blobs = {"model.safetensors": save(tensors), "tasks.safetensors": save(per_task)}
    meta = {"format": EXPORT_FORMAT, "config": state.config, "tasks": list(state.tasks), "step": int(state.step),
            "dataset_fingerprint": state.dataset_fingerprint, "task_envs": state.task_envs or {},
            "files": {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}}
    if os.path.exists(config_path := os.path.join(folder, "config.json")):
        os.unlink(config_path)
    for file_name, blob in blobs.items():
        atomic_write(os.path.join(folder, file_name), lambda f, blob=blob: f.write(blob))
    atomic_write(config_path, lambda f: json.dump(meta, f, indent=1), binary=False)
    return folder


def read_export(folder: str) -> RunState:
    """An export folder (this format or an older one, migrated) as a RunState without the resume part; its files
    must be the ones config.json names (sha256), its fields of the right types."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    paths = {name: os.path.join(folder, name) for name in EXPORT_FILES}
    for path in paths.values():
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (an export folder holds {', '.join(EXPORT_FILES)})")
    meta = _read_export_meta(paths["config.json"])
    for key, kind in (("config", dict), ("tasks", list), ("step", int), ("files", dict)):
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise CheckpointError(f"{paths['config.json']}: {key!r} is a {type(meta[key]).__name__}, expected "
                                  f"{kind.__name__}")
    if "config" not in meta or "tasks" not in meta:
        raise CheckpointError(f"{paths['config.json']}: lacks {[k for k in ('config', 'tasks') if k not in meta]}")
    loaded = {}
    for name in ("model.safetensors", "tasks.safetensors"):
        with open(paths[name], "rb") as f:
            data = f.read()
        want = meta.get("files", {}).get(name) if meta["format"] == EXPORT_FORMAT else None
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"{paths[name]}: not the file {paths['config.json']} was written with (sha256 "
                                  f"differs): an interrupted or mixed export; export it again")
        try:
            loaded[name] = load(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{paths[name]}: cannot be read as safetensors ({exc})") from exc
    per_task = loaded["tasks.safetensors"]
    prompts = {k.removeprefix("prompt."): v for k, v in per_task.items() if k.startswith("prompt.")}
    return RunState.from_dict({
        "format": _EXPORT_TO_CHECKPOINT_FORMAT[meta["format"]], "config": meta["config"],
        "model": loaded["model.safetensors"], "step": meta.get("step", 0), "tasks": meta["tasks"],
        "state_mean": per_task.get("state_mean"), "state_std": per_task.get("state_std"),  # missing: from_dict says
        "eval_prompts": prompts or None, "dataset_fingerprint": meta.get("dataset_fingerprint"),
        "task_envs": meta.get("task_envs") or {}}, folder)


def _read_export_meta(path: str) -> dict:
    """config.json of an export of this format or an older one; the error names this format when neither fits."""
    try:
        return read_json_format(path, EXPORT_FORMAT, "harmodt_fast export", CheckpointError)
    except CheckpointError as current:
        for older in (f for f in _EXPORT_TO_CHECKPOINT_FORMAT if f != EXPORT_FORMAT):
            try:
                return read_json_format(path, older, "harmodt_fast export", CheckpointError)
            except CheckpointError:
                pass
        raise current from None
