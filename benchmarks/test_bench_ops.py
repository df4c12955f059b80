"""pytest-benchmark suites for the masked matmul and the training step, for the device at hand, side by side in
one run (FLOPs and bytes in extra_info; render with `python -m harmodt_fast.benchmarks.render_benchmarks bench.json`).

    pytest benchmarks/test_bench_ops.py --benchmark-enable --benchmark-json=bench.json
    HARMODT_BENCH_QUICK=1 pytest benchmarks/test_bench_ops.py --benchmark-enable ...   # tiny shapes (CI)

masked_linear group: our op (Triton on CUDA, the C++ path on the CPU) against the unmasked dense F.linear (the
ceiling: the mask is 1 bit per weight) and against materialising W ⊙ M_t per task in plain PyTorch. FLOPs are
2 x rows x in x out (the matmul work; masking adds none), bytes the operands read and the output written.
mask_init group: one task's ERK mask of a large-preset layer (exact-count random subset vs a full permutation).
dropout group: hf.ops.dropout against torch's F.dropout on one paper-shaped activation.
train_step group: one optimiser step of ours (all tasks in one batch) against the published one-task-per-step
procedure (benchmarks/published_baseline.py) doing the same number of sequences (T of its steps); FLOPs
~ 6 x parameters x tokens, counted.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from harmodt_fast import method, ops
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.model import HarmoDT
from harmodt_fast.runtime import autocast_dtype

from harmodt_fast.benchmarks.published_baseline import PublishedProcedure

QUICK = os.environ.get("HARMODT_BENCH_QUICK") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# paper shapes: MLP-in of the paper model, MT50 x 8 sequences x 75 tokens = 30,000 rows (CPU: MT10)
TASKS = 3 if QUICK else (50 if DEVICE.type == "cuda" else 10)
ROWS_PER_TASK = 16 if QUICK else 600
N_IN, N_OUT = (24, 40) if QUICK else (256, 1024)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _linear_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TASKS * ROWS_PER_TASK, N_IN, generator=g).to(DEVICE, DTYPE)
    w = torch.randn(N_OUT, N_IN, generator=g).to(DEVICE, DTYPE)
    b = torch.randn(N_OUT, generator=g).to(DEVICE, DTYPE)
    packed = ops.pack_masks(torch.rand(TASKS, N_OUT * N_IN, generator=g) < 0.8).to(DEVICE)
    offsets = [t * ROWS_PER_TASK for t in range(TASKS + 1)]
    return x, w, b, packed, offsets


def _linear_info(benchmark, impl, packed_bytes=0):
    rows = TASKS * ROWS_PER_TASK
    esize = torch.empty(0, dtype=DTYPE).element_size()
    benchmark.extra_info.update({
        "group": "masked_linear", "impl": impl, "device": str(DEVICE), "dtype": str(DTYPE), "quick": QUICK,
        "tasks": TASKS, "rows": rows, "in": N_IN, "out": N_OUT, "flops": 2 * rows * N_IN * N_OUT,
        "bytes": (rows * N_IN + N_IN * N_OUT + rows * N_OUT) * esize + packed_bytes})


@pytest.mark.parametrize("impl", ["ours", "dense", "materialise-per-task"])
def test_bench_masked_linear_forward(benchmark, impl):
    x, w, b, packed, offsets = _linear_case()
    if impl == "ours":
        fn = lambda: ops.masked_linear(x, w, b, packed, offsets)  # noqa: E731
    elif impl == "dense":
        fn = lambda: F.linear(x, w, b)  # noqa: E731
    else:
        dense_masks = ops.unpack_masks(packed, N_OUT * N_IN).view(TASKS, N_OUT, N_IN).to(DTYPE)

        def fn():
            return torch.cat([F.linear(x[offsets[t]:offsets[t + 1]], w * dense_masks[t], b) for t in range(TASKS)])

    def run():
        with torch.no_grad():
            y = fn()
        _sync()
        return y

    y = benchmark(run)
    assert y.shape == (TASKS * ROWS_PER_TASK, N_OUT)
    _linear_info(benchmark, impl, packed.numel() * 4 if impl == "ours" else 0)
    if impl == "ours":
        benchmark.extra_info["backend"] = ops.last_backend("masked_linear")


def _step_config():
    preset = "tiny" if QUICK else "paper"
    return HarmoDTConfig.from_preset(preset, num_tasks=TASKS, schedule="mixed", mask_interval=10**9,
                                     batch_per_task=4 if QUICK else 8)


@pytest.mark.parametrize("impl", ["ours", "published"])
def test_bench_train_step(benchmark, impl):
    config = _step_config()
    amp = autocast_dtype(config, DEVICE)
    batches = SyntheticSampler(config, device=DEVICE)
    torch.manual_seed(0)
    if impl == "ours":
        model = HarmoDT(config).to(DEVICE)
        optimizer = method.make_optimizer(model, config)  # the trainer's (fused AdamW)
        batch = batches.sample()
        unused = method.unused_entries(model)

        def step():
            loss, _ = method.inner_step(model, optimizer, batch, config, unused, losses_fn=model.task_losses,
                                        amp_dtype=amp)
            _sync()
            return loss
        params = sum(p.numel() for p in model.parameters())
    else:
        published = PublishedProcedure(config, amp_dtype=amp, device=DEVICE)
        one_task = [batches.sample(task=t) for t in range(TASKS)]

        def step():  # as many sequences as one of our steps: one step per task
            for t, b in enumerate(one_task):
                published.train_step(b, t)
            _sync()
        params = sum(p.numel() for p in published.model.parameters())

    benchmark(step)
    sequences = TASKS * config.batch_per_task
    tokens = sequences * config.tokens_per_sequence
    benchmark.extra_info.update({"group": "train_step", "impl": impl, "device": str(DEVICE), "quick": QUICK,
                                 "tasks": TASKS, "sequences": sequences, "flops": 6 * params * tokens,
                                 "bytes": 4 * params * 4, "amp": str(amp)})


# dropout group: the dropout of one paper-shaped activation (rows x hidden, p 0.1): ours (hf.ops.dropout: the
# parallel C++ mask on the CPU; on CUDA it is torch's) against torch's F.dropout. Bytes: x read, y and the mask written
@pytest.mark.benchmark(group="dropout")
@pytest.mark.parametrize("impl", ["ours", "torch"])
def test_bench_dropout(benchmark, impl):
    x = torch.randn(TASKS * ROWS_PER_TASK, N_IN, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    fn = (lambda: ops.dropout(x, 0.1)) if impl == "ours" else (lambda: F.dropout(x, 0.1, training=True))

    def run():
        y = fn()
        _sync()
        return y

    y = benchmark(run)
    assert y.shape == x.shape and 0 < int((y == 0).sum()) < x.numel()
    benchmark.extra_info.update({"group": "dropout", "impl": impl, "device": str(DEVICE), "quick": QUICK,
                                 "elements": x.numel(), "flops": x.numel(),
                                 "bytes": x.numel() * (2 * x.element_size() + 1)})
    if impl == "ours":
        benchmark.extra_info["backend"] = ops.last_backend("dropout")


# mask_init group: one task's mask of one large-preset MLP layer (4096 x 1024 weights, 80% active), the exact-count
# subset ERK draws per task and layer, against the permutation it replaced
@pytest.mark.benchmark(group="mask_init")
@pytest.mark.parametrize("impl", ["random_subset", "torch.randperm"])
def test_bench_mask_init(benchmark, impl):
    import numpy as np

    from harmodt_fast.masks import random_subset

    n = 4096 if QUICK else 4096 * 1024
    k = int(0.8 * n)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)

    def permutation():
        dense = torch.zeros(n, dtype=torch.bool)
        dense[torch.randperm(n, generator=gen)[:k]] = True
        return dense

    fn = (lambda: random_subset(rng, n, k)) if impl == "random_subset" else permutation
    # bytes: the random keys drawn and the bool mask written (random_subset); flops: none counted
    benchmark.extra_info.update({"group": "mask_init", "impl": impl, "device": "cpu", "quick": QUICK, "weights": n,
                                 "active": k, "flops": 0, "bytes": 5 * n})
    assert int(benchmark(fn).sum()) == k
