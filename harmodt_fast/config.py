"""HarmoDTConfig: the model, mask and training settings of one run, with named presets."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field

from harmodt_fast.config_file import field_comments, read_mapping, yaml_text, yaml_value
from harmodt_fast.ops.harmony import DEFAULT_GAMMA, DEFAULT_SCORE, SCORE_TABLE  # the score choices: read live
from harmodt_fast.tasks import task_names

METHODS = ("harmodt", "random-masks", "prompt-dt", "mtdt")
PROMPT_SOURCES = ("train", "held-out")
TARGET_RETURNS = ("fixed", "data-max")
SCHEDULES = ("mixed", "round-robin")
PRECISIONS = ("auto", "fp32", "bf16")
BACKENDS = ("auto", "triton", "cpp", "torch")  # of the masked ops (harmodt_fast.ops); "auto": the fastest that runs
# compile's values by name: off (false), forward (true: the forward and loss) and step (the whole training step)
COMPILE_MODES = {"off": False, "forward": True, "step": "step"}
DEFAULT_PRESET = "demo"  # hf.train's and harmodt-fast train's when neither they nor a config file name one
# the largest model a config may describe: fp32 weights plus bit-packed masks (training needs about 4x more);
# a bound on sanity, so that a crafted config (layers: 1000000) is refused before anything is built
MAX_MODEL_BYTES = 64 * 2**30


@dataclass
class HarmoDTConfig:
    # Every field's line ends with its one-line meaning, a comment: `harmodt-fast train --help` lists the fields
    # with these (config_file.field_help), so they are the one description of each field.
    tasks: tuple[str, ...] | None = None  # the tasks' names or a task set (MT5, MT10, ...); None: the dataset's
    num_tasks: int = 5  # number of tasks (follows tasks when they are given)
    # model (Prompt-DT backbone)
    state_dim: int = 39  # state dimension (training takes it from the data)
    act_dim: int = 4  # action dimension (training takes it from the data)
    hidden: int = 256  # model width: embedding and attention dimension
    layers: int = 6  # transformer blocks
    heads: int = 8  # attention heads per block (hidden must be a multiple of heads)
    mlp_hidden: int = 1024  # width of each block's MLP
    activation: str = "relu"  # MLP activation: relu or gelu
    dropout: float = 0.1  # dropout probability in the blocks and the embeddings
    context: int = 20  # K: timesteps of trajectory per sequence
    prompt_len: int = 5  # timesteps of each task's prompt (0: no prompt)
    prompt_source: str = "train"  # train: prompts from the best training episodes (published); held-out: kept out
    max_ep_len: int = 1000  # rows of the timestep embedding (later timesteps share the last row)
    # method and masks
    method: str = "harmodt"  # harmodt, random-masks (ERK masks never updated), prompt-dt (no masks), mtdt (no prompt)
    score: str = DEFAULT_SCORE  # prune score of the mask update (ops/harmony.py SCORE_TABLE: fisher, magnitude, ...)
    density: float = 0.8  # share of the masked weights each task keeps (ERK init; kept by every update)
    gamma: float = DEFAULT_GAMMA  # weight of the agreement with the mean gradient in the prune score
    mask_interval: int = 500  # training steps between mask updates
    eta_min: int = 0  # flips per mask update at the start and end of training (raised-cosine schedule)
    eta_max: int = 100  # flips per mask update at mid-training (raised-cosine schedule)
    merge_threshold: int | None = None  # unseen tasks' consensus: None = half the trained tasks (published 25 of 50)
    flip_fraction: float = 0.0  # > 0: flips per update = this share of each task's active weights (not the schedule)
    # the mask update holds this much of per-task gradient rows at once (float32, G tasks x masked weights); when
    # all T tasks fit it is the whole-buffer update, else the streamed one in micro-batches of G tasks (method.py)
    mask_update_memory_mb: float | None = None  # MB of gradient rows an update holds; None: auto (GPU: half free; CPU: 256)
    # optimisation
    schedule: str = "mixed"  # mixed: every task in every step; round-robin: one task per step (published)
    steps: int = 1_000_000  # total training steps
    batch_per_task: int = 8  # sequences of every task per step (the global batch with several processes)
    lr: float = 1e-4  # AdamW learning rate after the warm-up
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 10_000  # steps of linear learning-rate warm-up
    grad_clip: float = 0.25  # the training step's gradient norm is clipped to this
    task_grad_clip: float = 0.25  # each task's gradient of a mask update is clipped to this norm
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and on CPUs with native bf16; "fp32"; "bf16"
    backend: str = "auto"  # of every masked op of the model (linear, MLP, attention): auto, triton, cpp or torch
    compile: bool | str = False  # torch.compile: false; true or forward: the forward and loss; step: the whole training step
    # logging, checkpoints, periodic evaluation (0 = off)
    log_every: int = 50  # steps between log lines in metrics.jsonl
    checkpoint_every: int = 1000  # steps between checkpoints
    keep_checkpoints: int = 0  # also keep the last N checkpoints as exports in checkpoints/step_<N>/ (0: none)
    eval_every: int = 0  # steps between evaluations during training, and after the last step (0: none)
    eval_episodes: int = 10  # episodes per task of each periodic evaluation
    eval_max_steps: int = 500  # steps per evaluation episode (Meta-World's 500; fewer only for quick checks)
    eval_workers: int | None = None  # environment worker processes of periodic evaluations (None: one per CPU)
    # loggers mirroring metrics.jsonl (harmodt_fast/loggers.py)
    logger: str | tuple[str, ...] | None = None  # "tensorboard", "wandb", a list of them, or None
    tensorboard: bool = False  # older spelling of logger="tensorboard", still accepted
    # returns-to-go and evaluation
    rtg_scale: float = 1000.0  # returns-to-go are divided by this
    target_return: float = 4500.0  # return-to-go an evaluation episode starts from (target_mode fixed)
    target_mode: str = "fixed"  # fixed: target_return for every task (published); data-max: each task's best return
    seed: int = 0  # seeds the weights, masks, batches and evaluations
    extra: dict = field(default_factory=dict, repr=False)  # free-form notes carried into checkpoints

    def __post_init__(self):
        self._check_types()
        if isinstance(self.compile, str):  # a mode's name, or true / false as text (a quoted value in a file)
            try:
                self.compile = self.parse_value("compile", self.compile)
            except ValueError:
                raise ValueError(f"HarmoDTConfig: compile must be true or false, got {self.compile!r} (or one of "
                                 f"the modes {tuple(COMPILE_MODES)})") from None
        if self.tasks is not None:
            self.tasks = tuple(self.tasks)
            self.num_tasks = len(self.tasks)
        from harmodt_fast.loggers import parse_loggers

        self.logger = parse_loggers(self.logger, self.tensorboard)  # unknown name -> ValueError naming it
        checks = [
            (self.num_tasks >= 1, f"num_tasks must be >= 1, got {self.num_tasks}"),
            (self.tasks is None or (all(self.tasks) and len(set(self.tasks)) == len(self.tasks)),
             f"tasks must be distinct non-empty names, got {self.tasks}"),
            (min(self.state_dim, self.act_dim) >= 1,
             f"state_dim and act_dim must be >= 1, got {self.state_dim} and {self.act_dim}"),
            (self.hidden > 0 and self.heads > 0 and self.hidden % self.heads == 0,
             f"hidden ({self.hidden}) must be a positive multiple of heads ({self.heads})"),
            (self.layers >= 1 and self.mlp_hidden >= 1, "layers and mlp_hidden must be >= 1"),
            (self.activation in ("relu", "gelu"), f"activation must be 'relu' or 'gelu', got {self.activation!r}"),
            (self.context >= 1 and self.prompt_len >= 0, "context must be >= 1 and prompt_len >= 0"),
            (self.max_ep_len >= 1, f"max_ep_len must be >= 1, got {self.max_ep_len}"),
            (self.method in METHODS, f"unknown method {self.method!r}; expected one of {METHODS}"),
            (self.prompt_source in PROMPT_SOURCES,
             f"unknown prompt_source {self.prompt_source!r}; expected one of {PROMPT_SOURCES}"),
            (self.target_mode in TARGET_RETURNS,
             f"unknown target_mode {self.target_mode!r}; expected one of {TARGET_RETURNS}"),
            (self.score in SCORE_TABLE, f"unknown score {self.score!r}; expected one of {tuple(SCORE_TABLE)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}"),
            (0.0 < self.density <= 1.0, f"density must be in (0, 1], got {self.density}"),
            (self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.batch_per_task >= 1, f"batch_per_task must be >= 1, got {self.batch_per_task}"),
            (self.mask_interval >= 1, f"mask_interval must be >= 1, got {self.mask_interval}"),
            (0 <= self.eta_min <= self.eta_max,
             f"eta_min and eta_max (flips per mask update) must satisfy 0 <= eta_min <= eta_max, got "
             f"eta_min={self.eta_min}, eta_max={self.eta_max}"),
            (self.eta_max <= self.masked_weights(),
             f"eta_max ({self.eta_max} flips per mask update) exceeds the {self.masked_weights()} masked weights"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}"),
            (self.mask_update_memory_mb is None or self.mask_update_memory_mb > 0,
             f"mask_update_memory_mb must be > 0 or None (auto), got {self.mask_update_memory_mb}"),
            (0.0 <= self.flip_fraction < 1.0, f"flip_fraction must be in [0, 1), got {self.flip_fraction}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.grad_clip > 0, f"grad_clip must be > 0 (the gradient norm clipped to), got {self.grad_clip}"),
            (self.task_grad_clip > 0, f"task_grad_clip must be > 0, got {self.task_grad_clip}"),
            (min(self.log_every, self.checkpoint_every) >= 1 and min(self.eval_every, self.keep_checkpoints) >= 0,
             "log_every and checkpoint_every must be >= 1, eval_every and keep_checkpoints >= 0"),
            (min(self.eval_episodes, self.eval_max_steps) >= 1,
             f"eval_episodes and eval_max_steps must be >= 1, got {self.eval_episodes} and {self.eval_max_steps}"),
            (self.eval_workers is None or self.eval_workers >= 0,
             f"eval_workers must be None or >= 0, got {self.eval_workers}"),
            (self.rtg_scale > 0, f"rtg_scale must be > 0, got {self.rtg_scale}"),
            (0 <= self.seed < 2**63, f"seed must be in 0..2**63-1, got {self.seed}"),
            (self.merge_threshold is None or 1 <= self.merge_threshold <= self.num_tasks,
             f"merge_threshold must be None or in 1..num_tasks ({self.num_tasks}), got {self.merge_threshold}"),
            (self.model_bytes() <= MAX_MODEL_BYTES,
             f"the model would take {self.model_bytes() / 2**30:.1f} GiB (hidden={self.hidden}, layers="
             f"{self.layers}, mlp_hidden={self.mlp_hidden}, max_ep_len={self.max_ep_len}, num_tasks="
             f"{self.num_tasks}), over the {MAX_MODEL_BYTES // 2**30} GiB any config may describe"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"HarmoDTConfig: {msg}")

    def _check_types(self) -> None:
        """Every field holds its declared type (typed_value), else a ValueError naming the field."""
        for name in self.field_names():
            setattr(self, name, self.typed_value(name, getattr(self, name)))

    @classmethod
    def typed_value(cls, name: str, value):
        """`value` as field `name`'s declared type (ints are ints, not bools or fractions; floats are finite numbers;
        ints and floats given as other number types are converted), else a ValueError naming the field."""
        hints = _field_types(cls)
        if name not in hints:
            raise ValueError(f"unknown config field {name!r}; known fields: {cls.field_names()}")
        kind = hints[name]
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        if value is None and type(None) in options:
            return None
        converted = _as_type(value, [o for o in options if o is not type(None)])
        if converted is _WRONG:
            raise ValueError(f"HarmoDTConfig: {name} must be {_describe(kind)}, got {value!r} "
                             f"({type(value).__name__})")
        return converted

    def masked_weights(self) -> int:
        """Entries of the masked weights (QKV, attention output, MLP in and out of every block), from the fields."""
        H, M = self.hidden, self.mlp_hidden
        return self.layers * (4 * H * H + 2 * H * M)

    def num_parameters(self) -> int:
        """The model's parameter count, from the fields alone (HarmoDT(config).num_parameters(), without building
        it: a config is checked against it before any model exists)."""
        H, M, A = self.hidden, self.mlp_hidden, self.act_dim
        embedding = H * (self.max_ep_len + self.state_dim + A + 4)  # timestep table and the R, s, a projections
        block = 4 * H * H + 2 * H * M + 9 * H + M  # masked projections with biases, two layer norms
        return (embedding * (2 if self.use_prompt else 1) + 4 * H + H * A + A + self.layers * block)

    def model_bytes(self) -> int:
        """Bytes of the model's fp32 weights and bit-packed task masks (about; the bound MAX_MODEL_BYTES checks)."""
        masks = self.num_tasks * self.masked_weights() // 8 if self.use_masks else 0
        return 4 * self.num_parameters() + masks

    @property
    def use_masks(self) -> bool:
        return self.method in ("harmodt", "random-masks")

    @property
    def updates_masks(self) -> bool:
        """The harmony mask update runs (random-masks keeps its initial ERK masks: the mechanism ablation)."""
        return self.method == "harmodt"

    @property
    def use_prompt(self) -> bool:
        return self.method != "mtdt" and self.prompt_len > 0

    @property
    def consensus_threshold(self) -> int:
        """Tasks that must keep a weight for the unseen-task consensus mask to keep it."""
        return self.merge_threshold if self.merge_threshold is not None else max(1, self.num_tasks // 2)

    @property
    def tokens_per_sequence(self) -> int:
        return 3 * (self.context + (self.prompt_len if self.use_prompt else 0))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HarmoDTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {cls.field_names()}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    @classmethod
    def parse_value(cls, name: str, text: str):
        """A field's value from text (a command line's --set), parsed by the field's declared type; a ValueError
        names the field, its type and the text. "none" is None where the field allows it; bools take
        true/false/1/0/yes/no/on/off; ints refuse fractions; tuples are comma-separated; dicts are JSON."""
        hints = _field_types(cls)
        if name not in hints:
            raise ValueError(f"unknown config field {name!r}; known fields: {cls.field_names()}")
        kind = hints[name]
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        if type(None) in options and text.strip().lower() in ("none", "null"):
            return None
        if name == "tasks":  # a task set or comma-separated names, resolved where the data is known
            return text
        plain = [o for o in options if o is not type(None)]
        # a str | tuple field (logger) takes the text as it is; bool | str (compile): a bool's words or a mode's name
        target = str if str in plain and bool not in plain else plain[0]
        try:
            if target is bool:
                word = text.strip().lower()
                if name == "compile" and word in COMPILE_MODES:
                    return COMPILE_MODES[word]
                if word not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError("expected true or false" + (
                        f", or one of the modes {tuple(COMPILE_MODES)}" if name == "compile" else ""))
                return word in ("true", "1", "yes", "on")
            if target is int:
                return int(text)
            if target is float:
                return float(text)
            if typing.get_origin(target) is tuple:
                return tuple(v.strip() for v in text.split(",") if v.strip())
            if target is dict:
                value = json.loads(text)
                if not isinstance(value, dict):
                    raise ValueError("expected a JSON object")
                return value
            return text
        except ValueError as exc:
            raise ValueError(f"config field {name!r} ({kind}): cannot parse {text!r}: {exc}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks) if self.tasks is not None else None
        d["logger"] = list(self.logger) if self.logger is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HarmoDTConfig":
        """The config of a dict (to_dict's, or a file's JSON): unknown fields and values of the wrong type are a
        ValueError naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a dict of fields, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}")
        return cls(**d)

    # ---- config files: harmodt-fast train --config, hf.train(config=), RUN/config.yaml ---------------------------
    @classmethod
    def from_file(cls, path, preset: str | None = None, **overrides) -> "HarmoDTConfig":
        """The config of a YAML or JSON file of fields (and optionally `preset: NAME`, its base): the preset, then
        the file, then `overrides`, each over the one before. A ValueError names the file and the field: unknown,
        of the wrong type or out of range, or YAML or JSON that does not parse."""
        return cls.resolve(preset, path, overrides)[0]

    @classmethod
    def resolve(cls, preset: str | None, path, overrides: dict) -> tuple["HarmoDTConfig", dict]:
        """(the config, the fields given by the file and overrides) of a preset (None: the file's `preset:`, else
        DEFAULT_PRESET), a config file (None: none) and overrides, each over the one before. Tasks given as a task
        set or comma-separated names become a tuple of names (names that are not Meta-World's are kept)."""
        fields = cls._file_fields(path) if path is not None else {}
        file_preset = fields.pop("preset", None)
        given = {**fields, **overrides}
        if given.get("tasks") is not None:
            given["tasks"] = tuple(task_names(given["tasks"]))  # any names: the dataset says which exist
        preset = preset or file_preset or DEFAULT_PRESET
        try:
            return cls.from_preset(preset, **given), given
        except ValueError as exc:  # a range or a combination (hidden and heads): name where the values came from
            if path is None:
                raise
            raise ValueError(f"{exc} (the config of preset {preset!r}, then {os.fspath(path)}, then the "
                             f"overrides)") from None

    @classmethod
    def _file_fields(cls, path) -> dict:
        """A config file's fields (and `preset`), each checked by its declared type; a ValueError names the file and
        the field. Text where a number or bool is due is parsed as --set parses it (YAML reads 1e-4 as text)."""
        fields, path = {}, os.fspath(path)
        for name, value in read_mapping(path).items():
            if name == "preset":
                if not isinstance(value, str) or value not in PRESETS:
                    raise ValueError(f"config file {path}: unknown preset {value!r}; expected one of "
                                     f"{sorted(PRESETS)}")
            elif name not in cls.field_names():
                close = difflib.get_close_matches(name, cls.field_names(), n=1)
                raise ValueError(f"config file {path}: unknown config field {name!r}" + (
                    f" (did you mean {close[0]!r}?)" if close else "; harmodt-fast train --help lists them"))
            else:
                try:  # the messages name the field
                    value = cls._typed_file_value(name, value)
                except ValueError as exc:
                    raise ValueError(f"config file {path}: {str(exc).removeprefix('HarmoDTConfig: ')}") from None
            fields[name] = value
        return fields

    @classmethod
    def _typed_file_value(cls, name: str, value):
        if name == "tasks" and isinstance(value, str):
            value = task_names(value)  # a task set or comma-separated names, as --set takes them
        try:
            value = cls.typed_value(name, value)
        except ValueError:
            if not isinstance(value, str):
                raise
            value = cls.typed_value(name, cls.parse_value(name, value))
        return tuple(task_names(value)) if name == "tasks" and value is not None else value

    def to_yaml(self, header: str = "") -> str:
        """Every field as YAML (after `header` as comment lines); from_file reads it back to this config."""
        return yaml_text(self.to_dict(), header)

    @classmethod
    def field_help(cls) -> str:
        """Every field with its type, default and one-line meaning (the comment on its line in this file)."""
        meanings, types_ = field_comments(cls), _field_types(cls)
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            kind = types_[f.name]
            kind = kind.__name__ if type(kind) is type else str(kind)
            lines += [f"  {f.name}: {kind} = {yaml_value(default)}", f"      {meanings[f.name]}"]
        return "\n".join(lines)


_WRONG = object()  # _as_type's "no such value of these types"


@functools.cache
def _field_types(cls) -> dict:
    """The declared type of each field (the annotations are strings: evaluated once per class, not per value)."""
    return typing.get_type_hints(cls)


def _as_type(value, kinds):
    """`value` as the first of `kinds` (declared field types) it fits, or _WRONG."""
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        if origin is bool:
            if isinstance(value, bool):
                return value
        elif origin is int:
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                return int(value)
        elif origin is float:
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        elif origin is str:
            if isinstance(value, str):
                return value
        elif origin is tuple:
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
        elif origin is dict:
            if isinstance(value, dict):
                return value
    return _WRONG


def _describe(kind) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             dict: "a dict", type(None): "None"}
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    return " or ".join(names.get(o, "a list of strings") for o in options)


PRESETS: dict[str, dict] = {
    # tests: seconds on a CPU
    "tiny": dict(hidden=64, layers=2, heads=2, mlp_hidden=256, context=5, prompt_len=2, max_ep_len=500,
                 steps=200, batch_per_task=4, warmup_steps=20, mask_interval=50, lr=1e-3, eta_max=20),
    # trains usefully on 2 CPU cores in minutes
    "demo": dict(hidden=128, layers=3, heads=4, mlp_hidden=512, context=10, prompt_len=5, max_ep_len=500,
                 steps=2000, batch_per_task=16, warmup_steps=200, mask_interval=100, lr=5e-4, eta_max=50),
    # the published HarmoDT defaults (docs/method.md)
    "paper": dict(),
    # for scale runs
    "large": dict(hidden=1024, layers=12, heads=16, mlp_hidden=4096),
}
