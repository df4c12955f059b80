"""The task-gradient cosine similarity (hf.ops.task_agreement) on every backend against an independent
computation (the whole [T, P] float64 matrix at once, norms from torch.linalg)."""
import pytest
import torch

import harmodt_fast as hf


def independent_cosine(grads):
    # the whole [T, P] float64 matrix at once, norms from torch.linalg
    g = grads.double()
    norms = torch.linalg.vector_norm(g, dim=1)
    return (g @ g.t()) / (norms[:, None] * norms[None, :])


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_agreement(cpp_ext, rng, backend, dtype):
    T, P = 40, 120_007  # three float64 chunks of 2**21 / T entries
    base = torch.randn(P, generator=rng)
    grads = (torch.randn(T, P, generator=rng) + torch.linspace(-2, 2, T)[:, None] * base).to(dtype)
    cos = hf.ops.task_agreement(grads, backend=backend)
    assert hf.ops.last_backend("task_agreement") == backend
    assert cos.dtype == torch.float64 and cos.shape == (T, T)
    torch.testing.assert_close(cos, independent_cosine(grads), rtol=0, atol=1e-12)
    assert torch.equal(cos, cos.t())
    assert cos.diagonal().tolist() == [1.0] * T


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_task_agreement_zero_and_bad(cpp_ext, rng, backend):
    grads = torch.randn(4, 1000, generator=rng)
    grads[2] = 0.0
    cos = hf.ops.task_agreement(grads, backend=backend)
    assert cos[2].abs().sum() == 0 and cos[:, 2].abs().sum() == 0
    keep = [0, 1, 3]
    torch.testing.assert_close(cos[keep][:, keep], independent_cosine(grads[keep]), rtol=0, atol=1e-12)
    grads[1, 10] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf .*task\(s\) \[1\]"):
        hf.ops.task_agreement(grads, backend=backend)
    with pytest.raises(ValueError, match=r"floating tensor \[T, P\]"):
        hf.ops.task_agreement(grads[0], backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_task_agreement(rng):
    grads = torch.randn(20, 70_001, generator=rng)
    cos = hf.ops.task_agreement(grads.cuda())
    assert hf.ops.last_backend("task_agreement") == "torch" and cos.device.type == "cuda"
    torch.testing.assert_close(cos.cpu(), independent_cosine(grads), rtol=0, atol=1e-12)
