"""hf.ops.dropout on every backend: the share of zeros is p (binomial bounds), kept entries are scaled by exactly
1/(1-p), backward applies the forward's mask and scale, the identity when not training; the cpp mask depends only
on the generator's state (not on the thread count) and a checkpointed generator state replays it."""
import math

import pytest
import torch

import harmodt_fast as hf


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_ext")
    return request.param


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape,dtype", [((7, 45, 33), torch.float32), ((100_003,), torch.float64),
                                         ((300, 301), torch.bfloat16)])
def test_share_scale_and_backward(backend, p, shape, dtype, rng):
    x = (torch.rand(shape, generator=rng, dtype=torch.float32) + 0.5).to(dtype).requires_grad_()
    y = hf.ops.dropout(x, p, backend=backend)
    assert hf.ops.last_backend("dropout") == backend and y.shape == x.shape and y.dtype == dtype
    kept = y != 0
    n = x.numel()
    share = 1.0 - kept.float().mean().item()
    assert abs(share - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (share, p)  # 5 sigma of a binomial
    rtol = {torch.float32: 3e-7, torch.float64: 1e-15, torch.bfloat16: 1e-2}[dtype]  # a rounding of x · 1/(1-p)
    torch.testing.assert_close(y.detach()[kept].double(), x.detach()[kept].double() / (1 - p), rtol=rtol, atol=0)
    dy = torch.randn(shape, generator=rng).to(dtype)
    y.backward(dy)
    torch.testing.assert_close(x.grad.float(), torch.where(kept, dy.float() / (1 - p), 0.0),
                               rtol=1e-2 if dtype == torch.bfloat16 else 3e-7, atol=0)


def test_identity_when_not_training_or_p_zero(backend):
    x = torch.randn(5, 6)
    assert hf.ops.dropout(x, 0.3, training=False, backend=backend) is x
    assert hf.ops.dropout(x, 0.0, backend=backend) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        hf.ops.dropout(x, 1.0, backend=backend)


def test_cpp_mask_follows_the_generator_not_the_threads(cpp_ext):
    x = torch.ones(200_001)
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(3)
        state = torch.get_rng_state()
        torch.set_num_threads(1)
        one = hf.ops.dropout(x, 0.25, backend="cpp")
        torch.set_rng_state(state)  # a resume restores the generator: the same mask
        torch.set_num_threads(max(2, threads))
        again = hf.ops.dropout(x, 0.25, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, again)
    assert not torch.equal(one, hf.ops.dropout(x, 0.25, backend="cpp"))  # the generator moved on: another mask


def test_model_uses_it_on_the_cpu(cpp_ext):
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=2, dropout=0.1)
    model = hf.HarmoDT(cfg)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.backend == "auto" for m in drops)
    x = torch.ones(64, 64)
    drops[0].train()
    drops[0](x)
    assert hf.ops.last_backend("dropout") == "cpp"
    reference = hf.HarmoDT(hf.HarmoDTConfig.from_dict({**cfg.to_dict(), "backend": "torch"}))
    assert all(m.backend == "torch" for m in reference.modules() if isinstance(m, torch.nn.Dropout))

