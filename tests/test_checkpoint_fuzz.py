"""Fuzzing the checkpoint and export readers (issue 21): from one small valid run, mutated configs (types, values),
tensors (names, shapes, dtypes, values, crafted views), dropped keys and cut or flipped bytes either load (and then
act, export and resume) or are refused with the project's own errors (CheckpointError, ValueError); nothing else
ever comes out. Derandomized, so a failure reproduces."""
import dataclasses
import json
import os
import tempfile

import numpy as np
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.checkpoint import CHECKPOINT_NAME, CheckpointError, RunState, read_run, save_atomic
from harmodt_fast.trainer import Trainer

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
FUZZ = hypothesis.settings(max_examples=100, deadline=None, derandomize=True, database=None,
                           suppress_health_check=list(hypothesis.HealthCheck))
TASKS = ("reach-v3", "button-press-v3")
OURS = (CheckpointError, ValueError)  # CheckpointError is a ValueError; listed for the reader

values = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=6) | st.sampled_from(["harmodt", "mtdt", "gelu", "bf16", "torch", "MT10", "reach-v3"])
          | st.lists(st.integers(-3, 3) | st.text(max_size=3), max_size=3)
          | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
                          torch.bool, torch.complex64])
fills = st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30])


def config():
    return hf.HarmoDTConfig.from_preset("tiny", tasks=TASKS, steps=4, mask_interval=2, log_every=2, precision="fp32")


def trainer(out):
    cfg = config()
    return Trainer(cfg, SyntheticSampler(cfg, seed=0), str(out), torch.device("cpu"), "synthetic")


class Valid(tuple):
    def __repr__(self):  # hypothesis prints the arguments of a failing case: not megabytes of them
        return "valid"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(the checkpoint dict of a tiny run stopped at step 2, the bytes of its file, the export's file bytes)."""
    root = tmp_path_factory.mktemp("fuzz")
    trainer(root / "run").run(stop_at=2, progress=False)
    path = str(root / "run" / CHECKPOINT_NAME)
    folder = hf.export(path, root / "export")
    files = {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}
    return Valid((RunState.load(path).to_dict(), open(path, "rb").read(), files))


def use(source) -> None:
    """Reads `source` as every reader does, acts with it and exports it: only our errors may come out, and what
    loads acts finitely."""
    try:
        state, _ = read_run(source)
        with tempfile.TemporaryDirectory() as tmp:
            hf.export(state, tmp)
        policy = hf.load_policy(state, device="cpu", precision="fp32")
    except OURS:
        return
    policy.reset(list(state.tasks))
    actions = policy.act(np.zeros((len(state.tasks), policy.config.state_dim)))
    assert np.isfinite(actions).all()


def resume(ckpt: dict) -> None:
    """A trainer resuming from `ckpt`: refused with our errors, or resumed at its step."""
    with tempfile.TemporaryDirectory() as tmp:
        save_atomic(ckpt, os.path.join(tmp, CHECKPOINT_NAME))
        try:
            t = trainer(tmp)
        except OURS:
            return
        assert t.step == ckpt["step"]


def mutate_tensor(data, t: torch.Tensor):
    """A tensor derived from `t`: another shape, dtype, fill, a crafted stride-0 view, or nothing (dropped)."""
    kind = data.draw(st.sampled_from(["shape", "dtype", "fill", "view", "drop", "scalar"]))
    if kind == "shape":
        shape = data.draw(st.lists(st.integers(0, 70), min_size=0, max_size=3))
        return torch.zeros(shape, dtype=t.dtype)
    if kind == "dtype":
        return t.to(data.draw(dtypes))
    if kind == "fill":
        out = t.clone().float() if not t.is_floating_point() else t.clone()
        flat = out.view(-1)
        if flat.numel():
            flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(fills)
        return out.to(t.dtype) if not t.is_floating_point() and data.draw(st.booleans()) else out
    if kind == "view":
        return torch.zeros(1, dtype=t.dtype).expand(data.draw(st.sampled_from([3_000_000_000, 10**6, t.numel()])))
    if kind == "scalar":
        return torch.tensor(data.draw(fills))
    return None


@FUZZ
@hypothesis.given(data=st.data())
def test_mutated_configs(valid, data):
    ckpt, _, _ = valid
    field = data.draw(st.sampled_from(sorted(ckpt["config"]) + ["unknown_field"]))
    bad = {**ckpt, "config": {**ckpt["config"], field: data.draw(values)}}
    use(bad)
    if data.draw(st.integers(0, 4)) == 0:  # resuming builds a trainer: fewer of them
        resume(bad)


@FUZZ
@hypothesis.given(data=st.data())
def test_mutated_tensors(valid, data):
    ckpt, _, _ = valid
    ckpt = {**ckpt, "model": dict(ckpt["model"]), "eval_prompts": dict(ckpt["eval_prompts"])}
    where = data.draw(st.sampled_from(["model", "model", "eval_prompts", "state_mean", "state_std", "task_agreement",
                                       "rename"]))
    if where == "rename":
        key = data.draw(st.sampled_from(sorted(ckpt["model"])))
        ckpt["model"][data.draw(st.sampled_from(["x", key + ".extra", key.replace("0", "7")]))] = \
            ckpt["model"].pop(key)
    elif where in ("model", "eval_prompts"):
        key = data.draw(st.sampled_from(sorted(ckpt[where])))
        new = mutate_tensor(data, ckpt[where][key])
        if new is None:
            del ckpt[where][key]
        else:
            ckpt[where][key] = new
    else:
        ckpt[where] = mutate_tensor(data, ckpt[where])
    use(ckpt)
    if data.draw(st.integers(0, 4)) == 0:
        resume(ckpt)


@FUZZ
@hypothesis.given(data=st.data())
def test_dropped_or_replaced_keys(valid, data):
    ckpt, _, _ = valid
    key = data.draw(st.sampled_from(sorted(ckpt)))
    part = data.draw(st.sampled_from(["drop", "value", "inner"]))
    if part == "drop":
        bad = {k: v for k, v in ckpt.items() if k != key}
    elif part == "value":
        bad = {**ckpt, key: data.draw(values)}
    else:  # inside a container: the optimizer's state, the rng list, the sampler
        opt = ckpt["optimizer"]
        choice = data.draw(st.sampled_from(["moment", "group", "rng", "sampler", "step"]))
        if choice == "moment":
            i = data.draw(st.sampled_from(sorted(opt["state"])))
            entry = dict(opt["state"][i])
            name = data.draw(st.sampled_from(sorted(entry)))
            new = mutate_tensor(data, entry[name])
            entry.pop(name) if new is None else entry.__setitem__(name, new)
            bad = {**ckpt, "optimizer": {**opt, "state": {**opt["state"], i: entry}}}
        elif choice == "group":
            group = {**opt["param_groups"][0], data.draw(st.sampled_from(["lr", "params", "betas", "eps"])):
                     data.draw(values)}
            bad = {**ckpt, "optimizer": {**opt, "param_groups": [group]}}
        elif choice == "rng":
            bad = {**ckpt, "rng": [{"torch": mutate_tensor(data, ckpt["rng"][0]["torch"])}]}
        elif choice == "sampler":
            bad = {**ckpt, "sampler": {k: data.draw(values) for k in ckpt["sampler"]}}
        else:
            bad = {**ckpt, "step": data.draw(values)}
    use(bad)
    resume(bad)


@FUZZ
@hypothesis.given(data=st.data())
def test_cut_or_flipped_bytes(valid, data):
    _, whole, files = valid
    with tempfile.TemporaryDirectory() as tmp:
        target = data.draw(st.sampled_from([CHECKPOINT_NAME, *files]))
        if target == CHECKPOINT_NAME:
            blob, path = whole, os.path.join(tmp, "run", CHECKPOINT_NAME)
        else:
            for name, content in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(content)
            blob, path = files[target], os.path.join(tmp, target)
        blob = bytearray(blob)
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 4))):
                blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(bytes(blob))
        use(os.path.dirname(path))


def test_the_fuzzed_run_is_valid_and_its_mutations_are_refused(valid):
    """The fuzzers start from a run every reader accepts, and a plain mutation of it is refused (they can fail)."""
    ckpt, _, files = valid
    use(ckpt)
    resume(ckpt)
    assert json.loads(files["config.json"])["files"].keys() == {"model.safetensors", "tasks.safetensors"}
    with pytest.raises(CheckpointError):
        read_run({**ckpt, "config": {**ckpt["config"], "layers": 3}})
    with pytest.raises(CheckpointError):
        read_run(dataclasses.replace(RunState.from_dict(ckpt), state_std=torch.zeros(2, 39)))
