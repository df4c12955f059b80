"""The Triton masked MLP block (fused chain kernel, and the two-launch path for wide layers) against the
reference: masked_linear -> activation -> masked_linear in plain PyTorch. Interpreter mode on small fp32 shapes
without a GPU."""
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.kernels import masked_mlp as kmlp
from helpers import close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(rng, counts, n_in, n_hid, n_out, T=None):
    T = T or len(counts)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    x = dev(torch.randn(sum(counts), n_in, generator=rng))
    w1 = dev(torch.randn(n_hid, n_in, generator=rng) / n_in**0.5)
    b1 = dev(torch.randn(n_hid, generator=rng) * 0.5)
    w2 = dev(torch.randn(n_out, n_hid, generator=rng) / n_hid**0.5)
    b2 = dev(torch.randn(n_out, generator=rng))
    m1 = dev(hf.ops.pack_masks(torch.rand(T, n_hid * n_in, generator=rng) < 0.7))
    m2 = dev(hf.ops.pack_masks(torch.rand(T, n_out * n_hid, generator=rng) < 0.7))
    offsets = [0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()
    return (x, w1, b1, w2, b2), m1, m2, offsets


def run(backend, leaves_in, m1, m2, offsets, act, dy, task_grads=(None, None), grad=True):
    leaves = [t.clone().requires_grad_(grad) for t in leaves_in]
    x, w1, b1, w2, b2 = leaves
    y = hf.ops.masked_mlp(x, w1, b1, m1, w2, b2, m2, offsets, activation=act, backend=backend,
                          task_grads1=task_grads[0], task_grads2=task_grads[1])
    ran = hf.ops.last_backend("masked_mlp")
    if grad:
        y.backward(dy)
    return ran, y.detach(), [t.grad for t in leaves]


CASES = [
    ([5, 0, 3], 17, 40, 13, "relu"),  # odd sizes, empty segment, per-element mask bits
    ([5, 0, 3], 17, 40, 13, "gelu"),
    ([20, 7, 0, 1], 64, 96, 32, "gelu"),  # whole-word mask bits, several hidden chunks
    ([1] * 9, 32, 64, 24, "relu"),  # many tasks
]


@pytest.mark.parametrize("fused", [True, False], ids=["chain", "two-launch"])
@pytest.mark.parametrize("counts,n_in,n_hid,n_out,act", CASES)
def test_mlp_forward_and_gradients_match_reference(counts, n_in, n_hid, n_out, act, fused, rng, monkeypatch):
    if not fused:  # the path wide layers take
        monkeypatch.setattr(kmlp, "FUSE_MAX_OUT", 0)
    leaves, m1, m2, offsets = make_case(rng, counts, n_in, n_hid, n_out)
    T = len(counts)
    dy = torch.randn(sum(counts), n_out, generator=rng).to(DEVICE)
    tg = {be: (torch.ones(T, n_hid, n_in, device=DEVICE), torch.ones(T, n_out, n_hid, device=DEVICE))
          for be in ("triton", "torch")}
    ran, y, grads = run("triton", leaves, m1, m2, offsets, act, dy, tg["triton"])
    assert ran == "triton"
    _, y_ref, grads_ref = run("torch", leaves, m1, m2, offsets, act, dy, tg["torch"])
    close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        close(got, want)
    for got, want in zip(tg["triton"], tg["torch"]):
        close(got, want)


@pytest.mark.parametrize("fused", [True, False], ids=["chain", "two-launch"])
def test_mlp_inference_path_and_extra_dims(fused, rng, monkeypatch):
    if not fused:
        monkeypatch.setattr(kmlp, "FUSE_MAX_OUT", 0)
    leaves, m1, m2, offsets = make_case(rng, [2, 3], 24, 48, 20)
    x3 = leaves[0].view(5, 1, 24).expand(5, 3, 24).contiguous()
    args = (x3,) + leaves[1:]
    with torch.no_grad():
        y = hf.ops.masked_mlp(args[0], args[1], args[2], m1, args[3], args[4], m2, offsets, backend="triton")
        assert hf.ops.last_backend("masked_mlp") == "triton"
        y_ref = hf.ops.masked_mlp(args[0], args[1], args[2], m1, args[3], args[4], m2, offsets, backend="torch")
    assert y.shape == (5, 3, 20)
    close(y, y_ref)


def test_mlp_bad_input(rng):
    (x, w1, b1, w2, b2), m1, m2, offsets = make_case(rng, [2, 3], 24, 48, 20)
    with pytest.raises(ValueError, match="activation"):
        hf.ops.masked_mlp(x, w1, b1, m1, w2, b2, m2, offsets, activation="tanh")
    with pytest.raises(ValueError, match="w2 must be"):
        hf.ops.masked_mlp(x, w1, b1, m1, w2[:, :-1], b2, m2, offsets)
    with pytest.raises(ValueError, match="masks_packed must be int32"):
        hf.ops.masked_mlp(x, w1, b1, m1, w2, b2, m1, offsets)
    with pytest.raises(ValueError, match="task_grads must be"):
        hf.ops.masked_mlp(x, w1, b1, m1, w2, b2, m2, offsets, task_grads2=torch.zeros(2, 48, 20, device=DEVICE))
