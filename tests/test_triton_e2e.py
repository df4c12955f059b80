"""The whole product through the Triton kernels: hf.train (with mask updates), resume and hf.evaluate with every
masked op on backend="triton", against the same runs on backend="cpp".

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the model
is the tiny preset shrunk further (one block, hidden 32) and runs are a handful of steps. Dropout is off: each
backend draws attention dropout from its own random stream, everything else is the same computation, so losses
agree to fp32 rounding and the mask updates pick the same weights.
"""
import json
import os

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.checkpoint import load_checkpoint
from harmodt_fast.cli import main

TASKS = ["reach-v3", "button-press-v3"]
MASKED_OPS = ("masked_linear", "masked_mlp", "masked_attention")
SMALL = dict(hidden=32, layers=1, heads=2, mlp_hidden=64, context=3, prompt_len=2, batch_per_task=2, dropout=0.0,
             precision="fp32", steps=5, mask_interval=2, log_every=1, warmup_steps=2, eta_max=8, lr=3e-3)
# the Triton side runs on CPU tensors in the interpreter, next to the cpp backend on the same batches; on a CUDA
# machine tests/test_cuda_step.py and the kernel tests cover the GPU
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter run (CUDA is available)")
RUNS = [("harmodt", "mixed"), ("harmodt", "round-robin"), ("prompt-dt", "mixed"), ("mtdt", "mixed")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "two-tasks"
    return hf.collect(TASKS, out, episodes_per_task=2, quality="near-optimal", seed=0, workers=1,
                      episode_steps=30, progress=False, verbose=False)


def masked_calls(before: dict) -> dict:
    """(op, backend) -> calls of the model's masked ops since the `before` snapshot of hf.ops.call_counts()."""
    now = hf.ops.call_counts()
    return {k: n - before.get(k, 0) for k, n in now.items() if k[0] in MASKED_OPS and n > before.get(k, 0)}


def train(dataset, out, backend, method, schedule, **kw):
    before = hf.ops.call_counts()
    res = hf.train(dataset, out, preset="tiny", device="cpu", progress=False, backend=backend, method=method,
                   schedule=schedule, **SMALL, **kw)
    return res, masked_calls(before)


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def assert_losses_close(got, want):
    assert [e["step"] for e in got] == [e["step"] for e in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), a["step"]
        for task in b["task_loss"]:
            assert a["task_loss"][task] == pytest.approx(b["task_loss"][task], rel=1e-4, abs=1e-6), (a["step"], task)


@pytest.mark.parametrize("method,schedule", RUNS, ids=[f"{m}-{s}" for m, s in RUNS])
def test_train_resume_evaluate_on_triton_match_cpp(dataset, tmp_path, method, schedule):
    # triton: stopped after 3 steps and resumed; cpp: straight through
    first, calls_first = train(dataset, tmp_path / "triton", "triton", method, schedule, stop_at=3)
    assert first.step == 3
    tri, calls_rest = train(dataset, tmp_path / "triton", "triton", method, schedule)
    ref, calls_ref = train(dataset, tmp_path / "cpp", "cpp", method, schedule)
    assert tri.step == ref.step == 5
    losses = lambda out: [e for e in log(out) if "loss" in e]  # noqa: E731
    assert_losses_close(losses(tmp_path / "triton"), losses(tmp_path / "cpp"))

    if method == "harmodt":
        # every call of every masked op ran the kernels: per forward, one fused attention, one fused MLP and the
        # attention output projection per block; none fell back to cpp or torch
        for calls in (calls_first, calls_rest):
            assert set(calls) == {(op, "triton") for op in MASKED_OPS}, calls
            assert calls[("masked_attention", "triton")] == calls[("masked_mlp", "triton")] \
                == calls[("masked_linear", "triton")]
        forwards = calls_first[("masked_mlp", "triton")] + calls_rest[("masked_mlp", "triton")]
        assert forwards == 5 + 2  # one per training step, one per mask update (steps 2 and 4)
        assert set(calls_ref) == {("masked_linear", "cpp")}
        updates = {b: [e["mask_update"] for e in log(tmp_path / b) if "mask_update" in e] for b in ("triton", "cpp")}
        assert len(updates["triton"]) == len(updates["cpp"]) == 2
        assert sum(u["flips"] for u in updates["triton"]) > 0
        for u, v in zip(*updates.values()):
            assert u["flips"] == v["flips"] and u["density"] == v["density"] == updates["cpp"][0]["density"]
        assert tri.masks == ref.masks  # the same weights flipped (no scores tie at this tolerance here)
        initial = hf.HarmoDT(tri.config).task_masks()
        assert tri.masks != initial
        assert torch.equal(tri.masks.active_counts(), initial.active_counts())  # density kept per task
    else:
        assert calls_first == calls_rest == calls_ref == {}  # no masks: plain linear layers
    ckpt_t, ckpt_r = load_checkpoint(tri.checkpoint), load_checkpoint(ref.checkpoint)
    assert ckpt_t["config"]["backend"] == "triton" and ckpt_r["config"]["backend"] == "cpp"
    for name, want in ckpt_r["model"].items():
        if want.is_floating_point():
            scale = max(1e-3, want.abs().max().item())
            torch.testing.assert_close(ckpt_t["model"][name], want, rtol=1e-3, atol=1e-4 * scale, msg=name)
    if (method, schedule) == ("harmodt", "mixed"):
        evaluate_on_both_backends(tri)


def evaluate_on_both_backends(run):
    """hf.evaluate's backend override reaches every masked op (in this process: workers=0); the rollouts agree."""
    reports = {}
    for backend in ("triton", "cpp"):
        before = hf.ops.call_counts()
        reports[backend] = hf.evaluate(run, episodes=1, max_episode_steps=3, workers=0, backend=backend)
        calls = masked_calls(before)
        want = {(op, "triton") for op in MASKED_OPS} if backend == "triton" else {("masked_linear", "cpp")}
        assert set(calls) == want, calls
        assert reports[backend]["masked_linear_backend"] == backend
    for task in TASKS:
        got, want = reports["triton"]["per_task"][task], reports["cpp"]["per_task"][task]
        assert got["lengths"] == want["lengths"]
        assert got["returns"] == pytest.approx(want["returns"], rel=1e-4, abs=1e-4)


def test_backend_that_cannot_run_fails_before_any_work(dataset, tmp_path, monkeypatch):
    from harmodt_fast.ops import _dispatch

    # the cpp backend on CUDA tensors is refused with the reason; so is triton without a GPU or the interpreter
    with pytest.raises(RuntimeError, match="cpp backend runs on CPU tensors"):
        _dispatch.check_backend("cpp", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpp', 'torch'\)"):
        hf.train(dataset, tmp_path / "bad", preset="tiny", steps=2, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_dispatch, "_decisions", {})  # the cached decisions were made under the interpreter
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="triton backend cannot run here: the triton backend needs"):
            hf.train(dataset, tmp_path / "run", preset="tiny", steps=2, backend="triton", device="cpu")
        assert not os.path.exists(tmp_path / "run")  # refused before the run folder, data or model
        ckpt = hf.train(dataset, tmp_path / "ok", preset="tiny", steps=1, progress=False, **{
            k: v for k, v in SMALL.items() if k != "steps"})
        with pytest.raises(RuntimeError, match="triton backend cannot run here"):
            hf.evaluate(ckpt, episodes=1, max_episode_steps=2, workers=0, backend="triton")


def test_cli_sets_the_backend(dataset, tmp_path, capsys):
    before = hf.ops.call_counts()
    code = main(["train", str(dataset), "--out", str(tmp_path), "--preset", "tiny", "--steps", "1", "--device",
                 "cpu", "--set", "backend=triton", "--set", "layers=1", "--set", "hidden=32", "--set",
                 "mlp_hidden=64", "--set", "context=3", "--set", "batch_per_task=1", "--no-progress"])
    assert code == 0
    assert load_checkpoint(str(tmp_path))["config"]["backend"] == "triton"
    assert set(masked_calls(before)) == {(op, "triton") for op in MASKED_OPS}


def test_streamed_mask_update_on_triton_matches_cpp(dataset, tmp_path):
    # a budget below one task's gradient row: the streamed update, one task per micro-batch, two passes each
    def run(backend):
        before = hf.ops.call_counts()
        res = hf.train(dataset, tmp_path / backend, preset="tiny", device="cpu", progress=False, backend=backend,
                       **{**SMALL, "steps": 3}, mask_update_memory_mb=0.01)
        return res, masked_calls(before)

    runs = {b: run(b) for b in ("triton", "cpp")}
    (tri, calls), (ref, _) = runs["triton"], runs["cpp"]
    assert set(calls) == {(op, "triton") for op in MASKED_OPS}, calls
    assert calls[("masked_mlp", "triton")] == 3 + 2 * 2  # 3 steps, one update: 2 passes x 2 one-task batches
    updates = [e["mask_update"] for e in log(tmp_path / "triton") if "mask_update" in e]
    assert [u["tasks_per_pass"] for u in updates] == [1] and updates[0]["flips"] > 0
    assert tri.masks == ref.masks
