"""A run's per-task policies as standalone graphs for deployment: ONNX files or torch.export programs (.pt2).

For one task HarmoDT is a plain dense Prompt-DT once the task's mask is multiplied into the weights (W ⊙ M_t), so
each file holds only standard ops: a copy of the model without masks (the `prompt-dt` shapes) with the task's
folded weights, the task's evaluation prompt and state normalisation as constants. The graph computes what
`hf.load_policy(..., precision="fp32")`'s Policy computes for one step of that task:

    inputs (B rows, dynamic; K = the config's context; the last K steps, oldest first, padding on the left)
        states          float32 [B, K, state_dim]   raw observations (normalised inside)
        actions         float32 [B, K, act_dim]     the actions taken (the last step's is ignored: it is predicted)
        returns_to_go   float32 [B, K]              target_return minus the rewards received before each step
        timesteps       int64   [B, K]              the step's index in the episode (clamped to max_ep_len - 1)
        attention_mask  bool    [B, K]              True for real steps; padded steps' values are ignored
    output
        action          float32 [B, act_dim]        the action for the last step

`manifest.json` beside the files names every task's file (and its sha256), the inputs and outputs, the dimensions,
the return-to-go target and scale, the state normalisation and the source run and step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import torch
import torch.nn as nn

from harmodt_fast._io import atomic_write_folder
from harmodt_fast.batch import Batch, Prompt
from harmodt_fast.checkpoint import export as export_safetensors
from harmodt_fast.checkpoint import read_run
from harmodt_fast.model import meta_model
from harmodt_fast.policy import policy_from_checkpoint, task_order

FORMATS = ("safetensors", "onnx", "torch.export")
POLICY_EXPORT_FORMAT = "harmodt_fast-policy/1"
MANIFEST_NAME = "manifest.json"
_SUFFIX = {"onnx": ".onnx", "torch.export": ".pt2"}
INPUT_NAMES = ("states", "actions", "returns_to_go", "timesteps", "attention_mask")
OUTPUT_NAME = "action"


def export(run, out, format: str = "safetensors", tasks=None) -> str:
    """Writes the policy of a run (checkpoint file, run folder, export folder, TrainResult, dict or RunState) to
    the folder `out`; returns it.

    format="safetensors" (default): config.json + safetensors, the whole multi-task model (checkpoint.export;
    hf.load_policy and hf.evaluate read it). format="onnx" | "torch.export": one file per task (`<task>.onnx`,
    checked with onnx.checker / `<task>.pt2`) and `manifest.json`: each the task's dense policy (this module's
    docstring gives its inputs and output). tasks: the tasks to export (default all the run's; names, a task set
    or a comma-separated string); a task the run was not trained on is a ValueError naming it.

    Safety: onnxruntime reads an .onnx file as data (a protobuf graph and its weights). torch.export.load reads a
    .pt2's graph from JSON and its weights as raw bytes, but unpickles its sample inputs (and any pickled constants)
    and, where the restricted weights_only load fails, retries with a full unpickle: a crafted .pt2 can run code.
    Load only .pt2 files you trust; share .onnx or the safetensors export otherwise.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")
    if format == "safetensors":
        if tasks is not None:
            raise ValueError("format='safetensors' exports the whole multi-task model: tasks= is for 'onnx' and "
                             "'torch.export'")
        return export_safetensors(run, out)
    _require(format)
    state, name = read_run(run)
    order = _export_tasks(state, tasks, name)
    folder = os.path.abspath(os.fspath(out))
    _check_out_folder(folder)
    policy = policy_from_checkpoint(state, order, torch.device("cpu"), precision="fp32", backend="torch")
    config = policy.config
    files = _file_names(order, _SUFFIX[format])

    def write(tmp: str) -> None:
        os.makedirs(tmp)
        entries = {}
        for i, task in enumerate(order):
            module = dense_task_policy(policy, i)
            path = os.path.join(tmp, files[task])
            _write_program(module, path, format)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            entries[task] = {"file": files[task], "sha256": digest, "model_task_id": int(policy.task_ids[i]),
                             "state_mean": policy.mean[i].tolist(), "state_std": policy.std[i].tolist(),
                             "target_return": float(policy.target_returns[i])}
        manifest = _manifest(state, name, config, format, policy.target_return, entries)
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=1)

    atomic_write_folder(folder, write)
    return folder


# ---- the dense per-task model ---------------------------------------------------------------------------------------
class DenseTaskPolicy(nn.Module):
    """One task's policy step (the module docstring's inputs -> action): a mask-free model holding W ⊙ M_t, the
    task's state normalisation and prompt as buffers."""

    def __init__(self, model, state_mean, state_std, prompt: Prompt | None, rtg_scale: float, max_ep_len: int):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("state_mean", state_mean.float().reshape(1, 1, -1).clone())
        self.register_buffer("state_std", state_std.float().reshape(1, 1, -1).clone())
        self.prompt_fields = [f.name for f in dataclasses.fields(Prompt)] if prompt is not None else []
        for f in self.prompt_fields:
            self.register_buffer(f"prompt_{f}", getattr(prompt, f).clone())  # [1, prompt_len, ...]
        self.rtg_scale, self.max_ep_len = float(rtg_scale), int(max_ep_len)

    def forward(self, states, actions, returns_to_go, timesteps, attention_mask):
        # Policy's window: padded columns are all zero, the last step's action is a zero placeholder
        valid = attention_mask.bool()
        K = states.shape[1]
        last = torch.arange(K, device=states.device) == K - 1
        states = torch.where(valid[..., None], (states - self.state_mean) / self.state_std, 0.0)
        actions = torch.where((valid & ~last)[..., None], actions, 0.0)
        rtg = torch.where(valid, returns_to_go / self.rtg_scale, 0.0)[..., None]
        steps = torch.where(valid, timesteps.clamp(0, self.max_ep_len - 1), 0)
        prompt = None
        if self.prompt_fields:
            B = states.shape[0]
            prompt = Prompt(**{f: getattr(self, f"prompt_{f}").expand(B, *getattr(self, f"prompt_{f}").shape[1:])
                               for f in self.prompt_fields})
        batch = Batch(states, actions, rtg, steps, valid, task_offsets=None, prompt=prompt)
        return self.model(batch)[:, -1]


def dense_task_policy(policy, position: int) -> DenseTaskPolicy:
    """The DenseTaskPolicy of task position `position` of a Policy (policy_from_checkpoint's): its model's weights
    with that task's mask folded in, copied into a mask-free model of the same shapes, in fp32 on the CPU."""
    source = policy.model
    masks = source.task_masks()
    task_id = int(policy.task_ids[position])
    weights = {k: v.detach().float().cpu() for k, v in source.state_dict().items() if not k.endswith("masks_packed")}
    if masks is not None:
        for name in masks.names:
            weights[name] = weights[name] * masks.to_dense(name, task_id).cpu()
    dense = meta_model(policy.config).to_empty(device="cpu")
    dense.load_state_dict(weights, strict=True)
    prompt = None
    if policy.prompt is not None:
        prompt = Prompt(**{f.name: getattr(policy.prompt, f.name)[position : position + 1].cpu()
                           for f in dataclasses.fields(Prompt)})
    return DenseTaskPolicy(dense, policy.mean[position].cpu(), policy.std[position].cpu(), prompt,
                           policy.config.rtg_scale, policy.config.max_ep_len).eval()


def _example_inputs(config, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of the exported graphs' shapes (a full window of `batch` rows): tracing and smoke tests."""
    K, S, A = config.context, config.state_dim, config.act_dim
    return (torch.zeros(batch, K, S), torch.zeros(batch, K, A), torch.zeros(batch, K),
            torch.arange(K).repeat(batch, 1), torch.ones(batch, K, dtype=torch.bool))


def _exported_program(module: DenseTaskPolicy):
    """torch.export.export of the module with the batch dimension dynamic."""
    batch = torch.export.Dim("batch", min=1)
    shapes = {name: {0: batch} for name in INPUT_NAMES}
    with torch.no_grad():
        return torch.export.export(module, _example_inputs(module.model.config), dynamic_shapes=shapes, strict=False)


# ---- files ----------------------------------------------------------------------------------------------------------
def _require(format: str) -> None:
    """A clear ImportError before any work when the format's packages are missing."""
    needed = {"onnx": ("onnx", "onnxscript"), "torch.export": ()}[format]
    missing = []
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"format={format!r} needs {', '.join(missing)}: pip install 'harmodt_fast[export]'")


def _write_program(module: DenseTaskPolicy, path: str, format: str) -> None:
    program = _exported_program(module)
    if format == "torch.export":
        torch.export.save(program, path)
        return
    import onnx

    # the torch.export-based exporter (PyTorch's default; the TorchScript one is deprecated) translates the same
    # program the .pt2 holds, so both formats come from one trace
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                     optimize=True, external_data=False, verbose=False)
    _name_batch_dimension(onnx_program.model)
    onnx_program.save(path)
    onnx.checker.check_model(path, full_check=True)


def _name_batch_dimension(model) -> None:
    """Calls the traced batch symbol (e.g. "s23") "batch" in every shape of the ONNX graph."""
    from onnx_ir import Shape, SymbolicDim

    symbol = model.graph.inputs[0].shape[0]
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph.all_nodes() for v in node.outputs)]
    for value in values:
        if value.shape is not None and any(d == symbol for d in value.shape):
            value.shape = Shape([SymbolicDim("batch") if d == symbol else d for d in value.shape])


def _export_tasks(state, tasks, name: str) -> list[str]:
    """The tasks to export, in model task-id order; a task the run was not trained on is a ValueError naming it."""
    from harmodt_fast.tasks import task_names

    trained = list(state.tasks)
    if tasks is None:
        return trained
    names = [tasks] if isinstance(tasks, str) and tasks in trained else task_names(tasks)
    unknown = [t for t in names if t not in trained]
    if unknown:
        raise ValueError(f"{name}: task(s) {unknown} are not among the run's tasks {trained}; a policy export holds "
                         f"tasks the run was trained on")
    return task_order(state, names, False, None, name)[1]


def _file_names(tasks, suffix: str) -> dict[str, str]:
    """A plain file name per task: its name with characters other than letters, digits, '.', '_', '-' as '_'."""
    names = {}
    for task in tasks:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", task).lstrip(".") or "task"
        candidate, n = stem + suffix, 1
        while candidate in names.values() or candidate == MANIFEST_NAME:
            candidate, n = f"{stem}-{n}{suffix}", n + 1
        names[task] = candidate
    return names


def _check_out_folder(folder: str) -> None:
    """The output folder is replaced as a whole, so it must be absent, empty or an earlier policy export holding
    only its manifest's files (never a run folder or anything else)."""
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: exists and is not a folder; nothing was written")
    entries = set(os.listdir(folder))
    if not entries:
        return
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        ours = {MANIFEST_NAME, *(t["file"] for t in manifest["tasks"].values())}
        if manifest.get("format") != POLICY_EXPORT_FORMAT:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{folder}: not empty and not a policy export (no readable {MANIFEST_NAME}): the export "
                         f"replaces the folder as a whole, so give a new or empty folder; nothing was written") from None
    others = sorted(entries - ours)
    if others:
        raise ValueError(f"{folder}: holds files its {MANIFEST_NAME} does not name ({others[:5]}): the export "
                         f"replaces the folder as a whole, so give a new or empty folder; nothing was written")


def _manifest(state, name: str, config, format: str, target_return: float, entries: dict) -> dict:
    K, S, A = config.context, config.state_dim, config.act_dim
    return {
        "format": POLICY_EXPORT_FORMAT,
        "kind": format,
        "source": {"run": name, "step": int(state.step), "dataset_fingerprint": state.dataset_fingerprint,
                   "method": config.method},
        "state_dim": S, "act_dim": A, "context": K, "prompt_len": config.prompt_len if config.use_prompt else 0,
        "max_ep_len": config.max_ep_len, "rtg_scale": config.rtg_scale, "target_return": target_return,
        "precision": "fp32",
        "inputs": [
            {"name": "states", "dtype": "float32", "shape": ["batch", K, S], "what": "raw observations of the last "
             "K steps, oldest first (normalised inside with the task's state_mean and state_std)"},
            {"name": "actions", "dtype": "float32", "shape": ["batch", K, A], "what": "the actions taken at those "
             "steps; the last step's is ignored"},
            {"name": "returns_to_go", "dtype": "float32", "shape": ["batch", K], "what": "target_return minus the "
             "rewards received before each step (divided by rtg_scale inside)"},
            {"name": "timesteps", "dtype": "int64", "shape": ["batch", K], "what": "each step's index in its "
             "episode, from 0 (clamped to max_ep_len - 1)"},
            {"name": "attention_mask", "dtype": "bool", "shape": ["batch", K], "what": "True for real steps; "
             "fewer than K steps so far are padded on the left with False"},
        ],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", A],
                     "what": "the action for the last step, in [-1, 1]"}],
        "tasks": entries,
    }
