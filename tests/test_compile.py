"""compile=True: the training step's forward and loss under torch.compile (inductor, fullgraph) give the eager
losses, with the masked ops traced as torch.library custom ops (triton, in the interpreter here) or as plain
PyTorch (the torch backend). compile="step": also the clip, the AdamW step and the frozen-entry restore, with the
same losses, parameters and frozen entries as eager. A tiny model; inductor's code generation takes half a minute
on 2 CPU cores, so one case of each generates code and the others trace with aot_eager
(HARMODT_FAST_COMPILE_BACKEND), which checks the same graphs and the same per-offsets recompiles."""
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.trainer import Trainer

SMALL = dict(num_tasks=2, layers=1, hidden=32, heads=2, mlp_hidden=64, context=3, prompt_len=2, batch_per_task=2,
             dropout=0.0, precision="fp32", steps=3, mask_interval=2, log_every=1, warmup_steps=2, lr=3e-3)


def losses(tmp_path, name, **kw):
    cfg = hf.HarmoDTConfig.from_preset("tiny", **{**SMALL, **kw})
    trainer = Trainer(cfg, SyntheticSampler(cfg, seed=0), str(tmp_path / name), torch.device("cpu"), "synthetic")
    result = trainer.run(progress=False)
    return [h["loss"] for h in result.history], result.masks


@pytest.mark.parametrize("backend,schedule,compiler", [("torch", "mixed", "inductor"),
                                                       ("torch", "round-robin", "aot_eager"),
                                                       ("cpp", "mixed", "aot_eager"),
                                                       ("triton", "mixed", "aot_eager")])
def test_compiled_step_matches_eager(tmp_path, backend, schedule, compiler, monkeypatch):
    monkeypatch.setenv("HARMODT_FAST_COMPILE_BACKEND", compiler)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    # the interpreter is slow: the triton case skips the (eager) mask update, which the torch cases cover
    kw = dict(backend=backend, schedule=schedule, **(dict(mask_interval=100, steps=2) if backend == "triton" else {}))
    eager, masks_eager = losses(tmp_path, "eager", **kw)
    compiled, masks_compiled = losses(tmp_path, "compiled", compile=True, **kw)
    assert len(compiled) == len(eager) == kw.get("steps", 3)
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-7)
    assert masks_compiled == masks_eager
    # fullgraph: any graph break would have raised; one graph per distinct task offsets (round-robin: per task)
    assert counters["stats"]["unique_graphs"] == (2 if schedule == "round-robin" else 1)
    if backend == "triton":
        assert hf.ops.last_backend("masked_mlp") == "triton"


def test_a_fresh_backend_record_does_not_recompile(tmp_path, monkeypatch):
    """The dispatcher's last-backend record is written by eager calls only: were the first traced call to write
    it, the second step would fail that guard and compile again (found in a fresh process)."""
    from harmodt_fast.ops import _dispatch

    monkeypatch.setenv("HARMODT_FAST_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(_dispatch, "_last", {})
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    losses(tmp_path, "fresh", compile=True, backend="cpp", mask_interval=100)
    assert counters["stats"]["unique_graphs"] == 1


# ---- compile="step": the clip, the AdamW step and the frozen-entry restore compiled too ----------------------------
from harmodt_fast import method  # noqa: E402
from harmodt_fast.compiled import CompiledStep, cuda_graphs_safe  # noqa: E402

GRAPH_OPS: list[set[str]] = []  # the functions each graph compiled by "recording_aot_eager" calls


def _recording_aot_eager(gm, example_inputs, **kwargs):
    GRAPH_OPS.append({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"})
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, example_inputs, **kwargs)


if "recording_aot_eager" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_recording_aot_eager, "recording_aot_eager")


class FrozenCheck(hf.Callback):
    """After every step: the entries the step had to keep (method.frozen_entries, taken before it) are bit for bit
    what they were; counts them and the entries that moved."""

    def __init__(self, trainer):
        self.frozen = self.moved = 0
        self._snapshot(trainer)

    def _snapshot(self, trainer):
        task = method.step_task(trainer.config, trainer.step)
        self.masks = method.frozen_entries(trainer.model, task, trainer._unused).masks
        self.before = {n: w.detach().clone() for n, w in self._weights(trainer).items()}

    def _weights(self, trainer):
        return {n: m.weight for n, m in trainer.model.masked_layers().items()}

    def on_log(self, trainer, entry):
        if "loss" not in entry:
            return
        for name, weight in self._weights(trainer).items():
            f = self.masks.get(name, torch.zeros_like(weight, dtype=torch.bool))
            assert torch.equal(weight[f], self.before[name][f]), f"a frozen entry of {name} moved"
            self.frozen += int(f.sum())
            self.moved += int((weight[~f] != self.before[name][~f]).sum())
        self._snapshot(trainer)  # after this step's mask update: the next step's frozen entries


def run_steps(tmp_path, name, **kw):
    cfg = hf.HarmoDTConfig.from_preset("tiny", **{**SMALL, "density": 0.3, "steps": 4, **kw})
    trainer = Trainer(cfg, SyntheticSampler(cfg, seed=0), str(tmp_path / name), torch.device("cpu"), "synthetic")
    check = FrozenCheck(trainer)
    trainer.callbacks = [check]
    result = trainer.run(progress=False)
    return trainer, [h["loss"] for h in result.history], check


@pytest.mark.parametrize("backend,schedule,method_name,compiler", [
    ("cpp", "mixed", "harmodt", "inductor"), ("cpp", "round-robin", "harmodt", "recording_aot_eager"),
    ("torch", "mixed", "prompt-dt", "recording_aot_eager")])
def test_compiled_whole_step_matches_eager(tmp_path, backend, schedule, method_name, compiler, monkeypatch):
    monkeypatch.setenv("HARMODT_FAST_COMPILE_BACKEND", compiler)
    torch._dynamo.reset()
    GRAPH_OPS.clear()
    kw = dict(backend=backend, schedule=schedule, method=method_name)
    eager, eager_losses, eager_check = run_steps(tmp_path, "eager", **kw)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # no silent eager fallback
        step, step_losses, step_check = run_steps(tmp_path, "step", compile="step", **kw)
    assert step_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-7) and len(step_losses) == 4
    want, got = eager.model.state_dict(), step.model.state_dict()
    for name in want:  # parameters within fp32 rounding (foreach vs fused AdamW); the masks bit for bit
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if method_name == "harmodt":  # the frozen entries stayed exactly frozen, the others moved
        assert step_check.frozen == eager_check.frozen > 0 and step_check.moved > 0
    # the compiled path ran: dynamo compiled the clip and the optimiser step, and the optimiser is the traceable one
    for fn in (method.clip_gradients, method.apply_gradients):
        assert torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__), fn.__name__
    assert step.optimizer.param_groups[0]["capturable"] and not step.optimizer.param_groups[0]["fused"]
    assert isinstance(step.optimizer.param_groups[0]["lr"], float)  # between steps: checkpoints as in eager mode
    if compiler == "recording_aot_eager":  # the graphs hold the clip's norm, AdamW's update and the restore
        called = set().union(*GRAPH_OPS)
        assert {"_foreach_norm", "_foreach_addcmul_", "_foreach_addcdiv_"} <= called, called
        if method_name == "harmodt":
            assert "where" in called


def test_compile_modes_resume_each_other(tmp_path, monkeypatch):
    """compile is a field a resumed run may change: eager to 2 steps, "step" to 4, eager to 6 follow the straight
    eager run (the optimiser state moves between the fused and the foreach AdamW)."""
    monkeypatch.setenv("HARMODT_FAST_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    kw = dict(steps=6, dropout=0.0, mask_interval=100)

    def train(name, stop_at, **more):
        cfg = hf.HarmoDTConfig.from_preset("tiny", **{**SMALL, **kw, **more})
        trainer = Trainer(cfg, SyntheticSampler(cfg, seed=0), str(tmp_path / name), torch.device("cpu"), "synthetic")
        return trainer.run(stop_at=stop_at, progress=False)

    straight = train("straight", 6)
    train("switched", 2)
    train("switched", 4, compile="step")
    switched = train("switched", 6)
    assert [h["loss"] for h in switched.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)


def test_compile_values_keep_their_meaning():
    build = lambda value: hf.HarmoDTConfig.from_preset("tiny", compile=value).compile  # noqa: E731
    assert [build(v) for v in (False, True, "off", "forward", "step", "Step", "true")] == [
        False, True, False, True, "step", "step", True]
    cfg = hf.HarmoDTConfig.from_preset("tiny", compile="step")
    assert hf.HarmoDTConfig.from_dict(cfg.to_dict()).compile == "step" and "compile: step" in cfg.to_yaml()
    with pytest.raises(ValueError, match=r"compile must be true or false, got 'steps' \(or one of the modes"):
        hf.HarmoDTConfig.from_preset("tiny", compile="steps")


def test_cuda_graphs_only_where_safe():
    cfg = lambda **kw: hf.HarmoDTConfig.from_preset("tiny", compile="step", **kw)  # noqa: E731
    cuda = torch.device("cuda")
    assert cuda_graphs_safe(cfg(method="prompt-dt"), cuda)
    assert not cuda_graphs_safe(cfg(method="prompt-dt"), torch.device("cpu"))
    assert not cuda_graphs_safe(cfg(method="prompt-dt"), cuda, world=2)  # DDP's hooks run in the backward
    assert not cuda_graphs_safe(hf.HarmoDTConfig.from_preset("tiny", compile=True, method="prompt-dt"), cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_cuda_compiled_step_captures_graphs_and_matches_eager(tmp_path):
    cuda = torch.device("cuda")
    runs = {}
    for mode in (False, "step"):
        torch._dynamo.reset()
        cfg = hf.HarmoDTConfig.from_preset("tiny", **{**SMALL, "dropout": 0.0, "steps": 6, "compile": mode})
        trainer = Trainer(cfg, SyntheticSampler(cfg, seed=0, device=cuda), str(tmp_path / str(mode)), cuda, "synth")
        assert isinstance(trainer._compiled, CompiledStep) and trainer._compiled.cuda_graphs == (mode == "step")
        runs[mode] = [h["loss"] for h in trainer.run(progress=False).history]
    assert runs["step"] == pytest.approx(runs[False], rel=1e-4)
