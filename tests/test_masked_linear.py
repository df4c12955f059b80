"""The plain-PyTorch reference of masked_linear against a naive per-task loop written here from scratch."""
import pytest
import torch

import harmodt_fast as hf


def random_case(rng, counts, n_in, n_out, T=None, dtype=torch.float64, extra_dims=()):
    T = T or len(counts)
    x = torch.randn(sum(counts), *extra_dims, n_in, generator=rng, dtype=dtype)
    w = torch.randn(n_out, n_in, generator=rng, dtype=dtype)
    b = torch.randn(n_out, generator=rng, dtype=dtype)
    dense = torch.rand(T, n_out, n_in, generator=rng) < 0.7
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)))
    return x, w, b, dense, offsets


def naive(x, w, b, dense, offsets):
    """Independent semantics: each row i of task t computes x_i · (W ⊙ M_t)ᵀ + b."""
    outs = []
    for t in range(len(offsets) - 1):
        for i in range(int(offsets[t]), int(offsets[t + 1])):
            outs.append(x[i] @ (w * dense[t].to(w.dtype)).t() + b)
    return torch.stack(outs) if outs else x.new_zeros(0, *x.shape[1:-1], w.shape[0])


CASES = [
    ([5, 0, 3], 17, 13),  # empty middle segment, odd sizes
    ([9], 33, 7),  # one task
    ([3, 1, 0, 4, 2, 5, 1], 20, 31),  # 7 tasks
    ([0, 0, 4], 16, 16),  # leading empty segments
]


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_ext")  # built once per session; a build failure fails the test
    return request.param


@pytest.mark.parametrize("counts,n_in,n_out", CASES)
def test_forward_backward_against_naive(counts, n_in, n_out, rng, backend):
    x, w, b, dense, offsets = random_case(rng, counts, n_in, n_out, extra_dims=(3,))
    packed = hf.ops.pack_masks(dense.flatten(1))
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    xr = [t.clone().requires_grad_() for t in (x, w, b)]
    y = hf.ops.masked_linear(xs[0], xs[1], xs[2], packed, offsets, backend=backend)
    assert hf.ops.last_backend("masked_linear") == backend
    y_ref = naive(xr[0], xr[1], xr[2], dense, offsets)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=rng, dtype=y.dtype)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in zip(xs, xr):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)


def test_weight_grad_is_masked_sum_and_task_grads(rng, backend):
    counts, n_in, n_out = [4, 0, 6], 11, 9
    x, w, b, dense, offsets = random_case(rng, counts, n_in, n_out, dtype=torch.float32)
    packed = hf.ops.pack_masks(dense.flatten(1))
    w.requires_grad_()
    task_grads = torch.zeros(3, n_out, n_in)
    y = hf.ops.masked_linear(x, w, b, packed, offsets, backend=backend, task_grads=task_grads)
    assert hf.ops.last_backend("masked_linear") == backend
    dy = torch.randn(y.shape, generator=rng)
    y.backward(dy)
    want_dw = torch.zeros_like(w)
    for t in range(3):
        lo, hi = int(offsets[t]), int(offsets[t + 1])
        g_t = dy[lo:hi].t() @ x[lo:hi]
        torch.testing.assert_close(task_grads[t], g_t, rtol=1e-5, atol=1e-5)
        want_dw += dense[t] * g_t
    torch.testing.assert_close(w.grad, want_dw, rtol=1e-5, atol=1e-5)
    assert torch.all(task_grads[1] == 0)  # the empty segment has no gradient
    # entries no task uses get no gradient at all
    unused = ~dense.any(0)
    assert torch.all(w.grad[unused] == 0)


def test_gradcheck_float64(rng, backend):
    x, w, b, dense, offsets = random_case(rng, [2, 0, 3], 5, 4)
    packed = hf.ops.pack_masks(dense.flatten(1))
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda a, ww, bb: hf.ops.masked_linear(a, ww, bb, packed, offsets, backend=backend), args
    )
    assert hf.ops.last_backend("masked_linear") == backend


def test_fewer_segments_than_masks_and_no_bias(rng, backend):
    x, w, _, dense, offsets = random_case(rng, [3, 2], 8, 6, T=5)
    packed = hf.ops.pack_masks(dense.flatten(1))
    y = hf.ops.masked_linear(x, w, None, packed, offsets, backend=backend)
    torch.testing.assert_close(y, naive(x, w, torch.zeros(6, dtype=w.dtype), dense, offsets))


def test_bad_input(rng):
    x, w, b, dense, offsets = random_case(rng, [3, 2], 8, 6, dtype=torch.float32)
    packed = hf.ops.pack_masks(dense.flatten(1))
    ml = hf.ops.masked_linear
    with pytest.raises(ValueError, match=r"x \(5, 7\)"):
        ml(torch.randn(5, 7), w, b, packed, offsets)
    with pytest.raises(ValueError, match="share one floating dtype"):
        ml(x.double(), w, b, packed, offsets)
    with pytest.raises(ValueError, match="bias must be"):
        ml(x, w, torch.zeros(5), packed, offsets)
    with pytest.raises(ValueError, match="masks_packed must be int32"):
        ml(x, w, b, packed[:, :-1], offsets)
    with pytest.raises(ValueError, match="non-decreasing"):
        ml(x, w, b, packed, torch.tensor([0, 6, 5]))
    with pytest.raises(ValueError, match="end at the batch size 5"):
        ml(x, w, b, packed, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="masks hold only 2"):
        ml(x, w, b, packed, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="1-D integer"):
        ml(x, w, b, packed, torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match="task_grads must be"):
        ml(x, w, b, packed, offsets, task_grads=torch.zeros(2, 6, 7))
    with pytest.raises(RuntimeError, match="there is no triton implementation"):
        hf.ops.harmony_update(torch.zeros(4), torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int32), 1,
                              backend="triton")
    from harmodt_fast.ops._dispatch import backend_unavailable_reason

    assert "CPU tensors" in backend_unavailable_reason("cpp", torch.device("cuda"))


def test_autocast_bf16_close_to_fp32(rng, backend):
    x, w, b, dense, offsets = random_case(rng, [7, 5], 64, 48, dtype=torch.float32)
    packed = hf.ops.pack_masks(dense.flatten(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hf.ops.masked_linear(x, w, b, packed, offsets, backend=backend)
    assert got.dtype == torch.bfloat16
    # bf16 rounds the inputs (the same in both) and the output (2^-8 relative); accumulation is in fp32
    bf = [t.bfloat16().double() for t in (x, w, b)]
    want = hf.ops.masked_linear(*bf, packed, offsets, backend="torch")
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=2**-7 * scale)


def test_auto_picks_cpp_on_cpu(rng, cpp_ext):
    x, w, b, dense, offsets = random_case(rng, [3, 2], 8, 6, dtype=torch.float32)
    hf.ops.masked_linear(x, w, b, hf.ops.pack_masks(dense.flatten(1)), offsets)
    assert hf.ops.last_backend("masked_linear") == "cpp"


def test_bf16_weight_grad_of_many_tasks_accumulates_in_fp32(rng, backend):
    """dW = Σ_t M_t ⊙ dY_tᵀX_t over an MT50-sized task count under bf16: the sum over tasks is kept in fp32, so
    the error against fp64 stays within one bf16 rounding of the result (a bf16 running sum grows with T)."""
    T, rows, n_in, n_out = 50, 6, 48, 40
    x64, w64, _, dense, offsets = random_case(rng, [rows] * T, n_in, n_out)
    dy64 = torch.randn(T * rows, n_out, generator=rng, dtype=torch.float64)
    x, w, dy = (t.to(torch.bfloat16) for t in (x64, w64, dy64))
    packed = hf.ops.pack_masks(dense.flatten(1))
    w = w.requires_grad_()
    hf.ops.masked_linear(x, w, None, packed, offsets, backend=backend).backward(dy)
    assert hf.ops.last_backend("masked_linear") == backend and w.grad.dtype == torch.bfloat16
    # the reference from the same bf16-rounded inputs, exactly
    xd, dyd = x.double(), dy.double()
    want = sum(dense[t].double() * (dyd[t * rows:(t + 1) * rows].t() @ xd[t * rows:(t + 1) * rows]) for t in range(T))
    err = (w.grad.double() - want).norm() / want.norm()
    assert err <= 2.0**-8, f"relative error {err:.2e} exceeds one bf16 rounding (2^-8 = {2.0**-8:.2e})"


def test_cpp_ops_have_fake_kernels(rng, cpp_ext):
    """The C++ mask expansion and accumulation pass torch.library.opcheck (schema, fake kernel, autograd
    registration), so torch.compile can trace the cpp backend."""
    w = torch.randn(7, 13, generator=rng)
    bits = hf.ops.pack_masks(torch.rand(1, 7 * 13, generator=rng) < 0.5)[0]
    torch.library.opcheck(torch.ops.harmodt_fast.masked_weight, (w, bits))
    torch.library.opcheck(torch.ops.harmodt_fast.masked_accumulate_, (torch.zeros(7, 13), w, bits))


def test_backend_decision_is_made_once(rng, monkeypatch):
    """Availability (an import, an extension load) is checked on the first call only, not in every op of a step."""
    from harmodt_fast.ops import _dispatch

    x, w, b, dense, offsets = random_case(rng, [3, 2], 8, 6, dtype=torch.float32)
    packed = hf.ops.pack_masks(dense.flatten(1), backend="torch")
    checked = []
    real = _dispatch.backend_unavailable_reason
    monkeypatch.setattr(_dispatch, "_decisions", {})
    monkeypatch.setattr(_dispatch, "backend_unavailable_reason", lambda *a: checked.append(a) or real(*a))
    before = hf.ops.call_counts().get(("masked_linear", "torch"), 0)
    for _ in range(3):
        hf.ops.masked_linear(x, w, b, packed, offsets, backend="torch")
    assert len(checked) == 1 and hf.ops.last_backend("masked_linear") == "torch"
    assert hf.ops.call_counts()[("masked_linear", "torch")] == before + 3
