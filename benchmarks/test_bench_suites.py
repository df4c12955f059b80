"""pytest-benchmark suites: the mixed-task sampler, the harmony mask update and one evaluation step (the batched
policy call behind hf.evaluate), each with its FLOPs and bytes in extra_info.

    pytest benchmarks/test_bench_suites.py --benchmark-enable --benchmark-json=bench.json      # this device
    HARMODT_BENCH_QUICK=1 pytest benchmarks/test_bench_suites.py --benchmark-enable ...        # tiny shapes (CI)

Shapes: the paper's MT50 (8 rows per task, K = 20, prompt 5, 4.7M masked weights) on CUDA; CPU: MT10 with the
paper model (MT50 steps take seconds there); quick: the tiny preset on 3 tasks. FLOPs and bytes are counts of the
work, not measurements: sampler = bytes of the batch it builds (no FLOPs to speak of); harmony = the elementwise
work over the [T, P] gradients (mean, agreement, score: about 6 flops per entry) and the bytes it must read
(gradients, weights, packed masks) and write (new packed masks); evaluation step = 2 x masked/dense weights x
tokens of the forward, and the weight bytes it reads.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import Prompt
from harmodt_fast.data import MultiTaskSampler
from harmodt_fast.policy import Policy

from harmodt_fast.benchmarks.sampler import SyntheticDataset

QUICK = os.environ.get("HARMODT_BENCH_QUICK") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = "tiny" if QUICK else "paper"
NUM_TASKS = 3 if QUICK else (50 if DEVICE.type == "cuda" else 10)
TASKS = hf.TASK_SETS["MT50"][:NUM_TASKS]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _info(benchmark, **values):
    benchmark.extra_info.update({"device": str(DEVICE), "preset": PRESET, "tasks": NUM_TASKS, "quick": QUICK,
                                 **values})


def test_bench_sampler(benchmark):
    config = hf.HarmoDTConfig.from_preset(PRESET, tasks=TASKS)
    ds = SyntheticDataset(TASKS, episodes=6 if QUICK else 50, steps=50 if QUICK else 500)
    sampler = MultiTaskSampler(ds, config, device=DEVICE, seed=0)

    def sample():
        batch = sampler.sample()
        _sync()
        return batch

    batch = benchmark(sample)
    tensors = [batch.states, batch.actions, batch.returns_to_go, batch.timesteps, batch.attention_mask]
    if batch.prompt is not None:
        tensors += [getattr(batch.prompt, f) for f in ("states", "actions", "returns_to_go", "timesteps",
                                                         "attention_mask")]
    _info(benchmark, rows=batch.num_rows, flops=0, bytes=int(sum(t.numel() * t.element_size() for t in tensors)))


def test_bench_harmony_update(benchmark):
    config = hf.HarmoDTConfig.from_preset(PRESET, tasks=TASKS)
    model = hf.HarmoDT(config)
    masks = model.task_masks()
    P = sum(layer.weight.numel() for layer in model.masked_layers().values())
    g = torch.Generator().manual_seed(0)
    grads = (1e-2 * torch.randn(NUM_TASKS, P, generator=g)).to(DEVICE)
    weight = torch.cat([layer.weight.detach().flatten() for layer in model.masked_layers().values()]).to(DEVICE)
    packed = masks.flat_packed().to(DEVICE)
    k = 100

    def update():
        out = hf.ops.harmony_update(weight, grads, packed, k, config.gamma, config.score)
        _sync()
        return out

    new_packed, _ = benchmark(update)
    assert new_packed.shape == packed.shape
    moved = grads.numel() * grads.element_size() + weight.numel() * weight.element_size() + \
        2 * packed.numel() * packed.element_size()
    _info(benchmark, masked_weights=P, flips_per_task=k, flops=6 * NUM_TASKS * P, bytes=int(moved),
          backend=hf.ops.last_backend("harmony_update"))


def test_bench_evaluation_step(benchmark):
    """One environment step's model work in hf.evaluate: act() for 10 episodes of every task, then observe()."""
    from harmodt_fast.trainer import autocast_dtype

    config = hf.HarmoDTConfig.from_preset(PRESET, tasks=TASKS)  # precision "auto", as evaluate runs it
    torch.manual_seed(0)
    model = hf.HarmoDT(config).to(DEVICE).eval()
    T, Kp, S = NUM_TASKS, config.prompt_len, config.state_dim
    prompt = Prompt(torch.randn(T, Kp, S), torch.rand(T, Kp, config.act_dim) * 2 - 1, torch.rand(T, Kp, 1),
                    torch.arange(Kp).repeat(T, 1), torch.ones(T, Kp, dtype=torch.bool))
    amp = autocast_dtype(config, DEVICE)
    policy = Policy(model, config, TASKS, list(range(T)), torch.zeros(T, S), torch.ones(T, S), prompt,
                    config.target_return, amp)
    episodes = 2 if QUICK else 10
    policy.reset([t for t in TASKS for _ in range(episodes)])
    obs = np.random.default_rng(0).standard_normal((T * episodes, S))
    rewards = np.ones(T * episodes)

    def step():
        actions = policy.act(obs)
        policy.observe(rewards)
        return actions

    actions = benchmark(step)
    assert actions.shape == (T * episodes, config.act_dim) and np.isfinite(actions).all()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # MaskedLinear is one
    n_weights = sum(w.numel() for w in weights)
    tokens = T * episodes * config.tokens_per_sequence
    _info(benchmark, rows=T * episodes, tokens=tokens, flops=2 * n_weights * tokens, amp=str(amp),
          bytes=int(sum(w.numel() * w.element_size() for w in weights)))
