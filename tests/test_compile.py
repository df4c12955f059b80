"""compile=True: the training step's forward and loss under torch.compile (inductor, fullgraph) give the eager
losses, with the masked ops traced as torch.library custom ops (triton, in the interpreter here) or as plain
PyTorch (the torch backend). A tiny model; inductor's code generation takes half a minute on 2 CPU cores, so
only one case generates code and the others trace with aot_eager (HARMODT_FAST_COMPILE_BACKEND), which checks
the same full graph and the same per-offsets recompiles."""
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
