"""The checks of a run state (checkpoint.RunState) before anything is built from it: field types, the config,
tensor names, shapes, dtypes and storage, finite values, non-empty masks, and the resume part. Every failure is a
CheckpointError naming the file and the field or tensor."""
from __future__ import annotations

import math

import torch

# the fields every run state has (checkpoint.RunState: an export's too)
REQUIRED_FIELDS = ("config", "model", "tasks", "state_mean", "state_std")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the run asking for it."""


def check_consistent(state, name: str) -> None:
    """The one check of a run state before any model is built from it (CheckpointError naming the file and field or
    tensor): the config passes HarmoDTConfig's checks; tasks, statistics, prompts and the model's tensors (names,
    shapes, dtypes) are those of the config's model; every storage holds its shape (a crafted stride-0 view is
    never materialised); every float is finite, every std > 0, every task's mask keeps a weight."""
    check_field_types(state, name)
    tensors = {f"model[{k!r}]": v for k, v in state.model.items()}
    tensors.update({f"eval_prompts[{k!r}]": v for k, v in (state.eval_prompts or {}).items()})
    tensors.update({k: getattr(state, k) for k in ("state_mean", "state_std", "best_return", "task_agreement")
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
    for key, shape in (("state_mean", (T, S)), ("state_std", (T, S)), ("best_return", (T,))):
        value = getattr(state, key)  # best_return may be None (older runs): the others are required fields
        if value is not None and (tuple(value.shape) != shape or value.dtype not in floats):
            problems.append(f"{key} has shape {tuple(value.shape)} ({value.dtype}), expected {shape} of floats")
    if config.target_mode == "data-max" and state.best_return is None:
        problems.append("config.target_mode is data-max but the checkpoint has no best_return")
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
                "world_size": int, "best_return": torch.Tensor}


def check_field_types(state, name: str) -> None:
    """CheckpointError naming the first field of `state` that holds the wrong type."""
    for key, kinds in _FIELD_TYPES.items():
        value = getattr(state, key)
        if (value is not None or key in REQUIRED_FIELDS) and (not isinstance(value, kinds) or isinstance(value, bool)):
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
    """{name: (shape, is_mask)} of the state dict of HarmoDT(config), from its shapes-only build (meta_model)."""
    from harmodt_fast.model import meta_model
    from harmodt_fast.ops.packing import words_for

    model = meta_model(config)
    expected = {k: (tuple(v.shape), False) for k, v in model.state_dict().items()}
    if config.use_masks:
        for weight, layer in model.masked_layers().items():
            expected[weight.removesuffix("weight") + "masks_packed"] = (
                (config.num_tasks, words_for(layer.weight.numel())), True)
    return expected


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


def check_resume_part(state, name: str) -> None:
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
