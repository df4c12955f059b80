"""Ops per training step: what one step (method.inner_step as the trainer calls it: forward, losses, backward,
clip, AdamW, frozen-entry restore) dispatches, counted at the dispatcher (a TorchDispatchMode). The count does not
grow with the number of tasks on the cpp and on the triton backend (the kernels under the interpreter here), and
no op of the step reads a tensor back to the host (_local_scalar_dense: what .item(), int() or bool() of a tensor
dispatch, a host synchronisation on CUDA)."""
import tempfile

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.trainer import Trainer
from helpers import OpCounter

# the shapes the triton interpreter runs in seconds (the count depends on the layers, not on the shapes)
SMALL = dict(hidden=32, heads=2, mlp_hidden=64, context=2, prompt_len=1, batch_per_task=1, layers=1)


def step_ops(num_tasks: int, warmup: int = 1, **overrides) -> dict[str, int]:
    """The ops of the training step after `warmup` steps of a fresh tiny run (the first creates the optimiser's
    state; a compiled step's first ones compile)."""
    # density 0.1: some entries no task uses, at 16 tasks too (the restore runs)
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=num_tasks, dropout=0.1, density=0.1, **overrides)
    sampler = SyntheticSampler(cfg)
    batches = [sampler.sample() for _ in range(warmup + 1)]  # built before counting: a step reads no host data
    sampler.sample = lambda task=None: batches.pop(0)
    trainer = Trainer(cfg, sampler, tempfile.mkdtemp(), torch.device("cpu"), "synthetic")
    assert trainer._unused.masks, "no frozen entries: the restore path would not run"
    for _ in range(warmup):
        trainer._train_step()
    with OpCounter() as counter:
        trainer._train_step()
    assert hf.ops.last_backend("masked_linear") == overrides.get("backend", "cpp")
    return counter.ops


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_ops_per_step_do_not_grow_with_the_tasks(backend, cpp_ext):
    overrides = dict(backend=backend, **(SMALL if backend == "triton" else {}))
    few, many = step_ops(2, **overrides), step_ops(16, **overrides)
    total_few, total_many = sum(few.values()), sum(many.values())
    assert abs(total_many - total_few) <= 16, (total_few, total_many, (many - few) + (few - many))
    # nothing dispatched once per task and layer: the masked ops run once per layer (and pass)
    layers = 4 * hf.HarmoDTConfig.from_preset("tiny", **overrides).layers  # masked layers
    for name in ("harmodt_fast.masked_weight", "harmodt_fast.masked_accumulate_", "harmodt_fast.masked_mm",
                 "harmodt_fast.masked_dw"):
        assert few[name] == many[name] <= 2 * layers, (name, few[name], many[name])
    assert many["aten.mm"] + many["aten.bmm"] + many["aten.addmm"] + many["aten.baddbmm"] <= 8 * layers


@pytest.mark.slow  # inductor compiles the step for each task count: a minute on 2 cores, less with its cache
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_compiled_step_dispatches_a_few_hundred_ops_whatever_the_tasks(backend, cpp_ext):
    """compile="step" (inductor): the forward, backward, clip, AdamW and restore run as generated code, which
    dispatches only the masked ops, their matmuls, autograd's one detach per parameter and a few others. The
    eager step dispatches 3-4x as many."""
    torch._dynamo.reset()
    overrides = dict(backend=backend, compile="step", **SMALL)
    eager = sum(step_ops(2, **{**overrides, "compile": False}).values())
    # the first steps compile: the forward twice (the backend choices it records change once), AdamW's first step
    few, many = step_ops(2, warmup=2, **overrides), step_ops(5, warmup=2, **overrides)
    assert sum(few.values()) == sum(many.values()) <= min(150, eager // 2), (eager, few, many)
    assert many["aten._local_scalar_dense"] == 0 and many["aten.nonzero"] == 0  # no host read either
    # AdamW and the restore (a where per masked layer) run as generated code; the 2 wheres left are the divergence
    # guard's (StepWatch.record, eager)
    assert many["aten._fused_adamw_"] == many["aten._foreach_add_"] == 0 and many["aten.where"] <= 2


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_step_reads_nothing_back_to_the_host(backend, cpp_ext):
    ops = step_ops(3, backend=backend, **(SMALL if backend == "triton" else {}))
    assert ops["aten._local_scalar_dense"] == 0, "a step read a tensor back to the host"
    assert ops["aten.nonzero"] == 0  # boolean indexing: a host synchronisation for its size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (set_sync_debug_mode)")
def test_cuda_step_never_synchronises():
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=4)
    trainer = Trainer(cfg, SyntheticSampler(cfg, device=torch.device("cuda")), tempfile.mkdtemp(),
                      torch.device("cuda"), "synthetic")
    trainer._train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer._train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
