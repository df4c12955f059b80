"""Helpers the tests share (one copy each)."""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def close(got, want, tol=2e-5):
    """got ≈ want with relative tolerance tol, absolute tol scaled by want's largest magnitude; no NaN (a NaN is an
    element a kernel never wrote)."""
    assert got is not None and want is not None
    assert not torch.isnan(got).any(), "NaN in the output"
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def dt_mask(rng, B, L, device="cpu"):
    """The attention mask HarmoDT builds, [B, 1, L, L]: causal, left-padded keys hidden (random padding up to half
    the sequence), every token sees itself."""
    valid = torch.arange(L)[None, :] >= torch.randint(0, max(1, L // 2), (B, 1), generator=rng)
    m = (torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)
    return m[:, None].to(device)


class OpCounter(TorchDispatchMode):
    """Counts the aten (and custom) ops dispatched inside it, by name; of a torch.compiled function, the ops its
    compiled code dispatches (without ignore_compile_internals, dynamo would run it eagerly under the mode)."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


POLICY_TASKS = ["reach-v3", "button-press-v3"]


def train_tiny_policy_run(root):
    """A tiny fp32 run trained by hf.train on expert data collected for POLICY_TASKS (seconds): what the policy and
    export tests act with."""
    import harmodt_fast as hf

    data = hf.collect(POLICY_TASKS, root / "data", episodes_per_task=3, quality="expert", seed=0, workers=1,
                      episode_steps=30, progress=False, verbose=False)
    return hf.train(data, root / "run", preset="tiny", steps=6, mask_interval=3, log_every=3, progress=False,
                    precision="fp32", device="cpu")
