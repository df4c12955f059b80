"""masked_linear on every backend. The plain-PyTorch reference and the C++ op against a naive per-task loop written
here from scratch; the Triton kernels against the reference op.

Without a GPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small fp32
shapes chosen to be awkward: sizes that are not multiples of 16, empty segments, one task, many tasks, rows that
span several row tiles and several dW row splits, weight rows that are whole 32-bit mask words (the word-expansion
path) and rows that are not (the per-element path). The GPU versions at real shapes are in test_gpu_kernels.py.
"""
import pytest
import torch
import torch.nn.functional as F

import harmodt_fast as hf
from helpers import close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    ([5, 0, 3], 17, 13),  # empty middle segment, odd sizes, per-element mask bits
    ([9], 33, 7),  # one task
    ([3, 1, 0, 4, 2, 5, 1], 20, 31),  # 7 tasks
    ([0, 0, 4], 16, 16),  # leading empty segments
    ([20, 0, 45, 3], 64, 96),  # whole-word mask bits, segments over several row tiles
    ([1] * 12, 32, 40),  # many tasks of one row
    ([70], 96, 24),  # one long segment: several dW row splits inside one task
    ([4, 4, 4, 4, 4], 19, 33),  # equal segments: the cpp backend's batched path
]


def make_case(rng, counts, n_in, n_out, T=None, extra_dims=()):
    """random_case in fp32 with the masks packed and every tensor on DEVICE: the Triton kernels' input."""
    x, w, b, dense, offsets = random_case(rng, counts, n_in, n_out, T, dtype=torch.float32, extra_dims=extra_dims)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(b), to(hf.ops.pack_masks(dense.flatten(1))), offsets.tolist()


def run(backend, x, w, b, packed, offsets, dy, task_grads=None, grads=(True, True, True)):
    leaves = [t.clone().requires_grad_(g) if t is not None else None for t, g in zip((x, w, b), grads)]
    y = hf.ops.masked_linear(leaves[0], leaves[1], leaves[2], packed, offsets, backend=backend,
                             task_grads=task_grads)
    ran = hf.ops.last_backend("masked_linear")
    if any(grads):
        y.backward(dy)
    return ran, y.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    """The backends the reference tests run on; a test adds "triton" by indirect parametrisation."""
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


@pytest.mark.parametrize("counts", [[4, 0, 6], [5, 5, 5]])  # the per-task loop; equal segments (batched)
def test_weight_grad_is_masked_sum_and_task_grads(rng, backend, counts):
    n_in, n_out = 11, 9
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
    if counts[1] == 0:
        assert torch.all(task_grads[1] == 0)  # the empty segment has no gradient
    # entries no task uses get no gradient at all
    unused = ~dense.any(0)
    assert torch.all(w.grad[unused] == 0)


@pytest.mark.parametrize("counts", [[2, 0, 3], [2, 2, 2]])
def test_gradcheck_float64(rng, backend, counts):
    x, w, b, dense, offsets = random_case(rng, counts, 5, 4)
    packed = hf.ops.pack_masks(dense.flatten(1))
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda a, ww, bb: hf.ops.masked_linear(a, ww, bb, packed, offsets, backend=backend), args
    )
    assert hf.ops.last_backend("masked_linear") == backend


@pytest.mark.parametrize("counts", [[6, 5], [6, 6]])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"], indirect=True)
def test_fewer_segments_than_masks_and_no_bias(rng, backend, counts):
    """More masks than segments and no bias: the output against the naive loop, dX and dW against autograd through
    it (the Triton kernels in fp32, which they run in, on DEVICE; the others in fp64 on the CPU)."""
    triton = backend == "triton"
    x, w, _, dense, offsets = random_case(rng, counts, 19, 11, T=4, dtype=torch.float32 if triton else torch.float64)
    device = DEVICE if triton else "cpu"
    x, w, dense = x.to(device), w.to(device), dense.to(device)
    packed = hf.ops.pack_masks(dense.flatten(1))
    dy = torch.randn(sum(counts), 11, generator=rng, dtype=x.dtype).to(device)
    ran, y, grads = run(backend, x, w, None, packed, offsets, dy, grads=(True, True, False))
    assert ran == backend
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    y_ref = naive(*leaves, torch.zeros(11, dtype=x.dtype, device=device), dense, offsets)
    y_ref.backward(dy)
    check = close if triton else torch.testing.assert_close
    check(y, y_ref.detach())
    check(grads[0], leaves[0].grad)
    check(grads[1], leaves[1].grad)


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


# The Triton kernels against the reference op ---------------------------------------------------------------
@pytest.mark.parametrize("counts,n_in,n_out", CASES)
def test_forward_and_every_gradient_match_reference(counts, n_in, n_out, rng):
    x, w, b, packed, offsets = make_case(rng, counts, n_in, n_out)
    T = len(counts)
    dy = torch.randn(x.shape[0], n_out, generator=rng).to(DEVICE)
    # task_grads starts non-zero: backward must add into it, not overwrite
    start = torch.randn(T, n_out, n_in, generator=rng).to(DEVICE)
    tg_tri, tg_ref = start.clone(), start.clone()
    ran, y, grads = run("triton", x, w, b, packed, offsets, dy, tg_tri)
    assert ran == "triton"
    _, y_ref, grads_ref = run("torch", x, w, b, packed, offsets, dy, tg_ref)
    close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        close(got, want)
    close(tg_tri, tg_ref)


@pytest.mark.parametrize("backend", ["triton", "cpp"], indirect=True)
def test_task_grads_as_a_slice_of_one_task_by_parameter_buffer(backend, rng):
    """The trainer hands every layer its column slice of one [T, P] buffer (task stride P, not out*in): the dW
    kernel must add into that view in place, without a copy and without touching the neighbouring columns."""
    counts, n_in, n_out = [6, 0, 9], 24, 20
    x, w, b, packed, offsets = make_case(rng, counts, n_in, n_out)
    dy = torch.randn(x.shape[0], n_out, generator=rng).to(DEVICE)
    T, n, before = len(counts), n_out * n_in, 7
    if backend == "cpp" and DEVICE != "cpu":
        pytest.skip("the cpp backend runs on CPU tensors")
    buffer = torch.full((T, before + n + 5), 3.0, device=DEVICE)  # other layers' columns on both sides
    view = buffer[:, before : before + n].view(T, n_out, n_in)
    assert not view.is_contiguous() and view.stride(0) == buffer.shape[1]
    ran, _, grads = run(backend, x, w, b, packed, offsets, dy, view)
    assert ran == backend
    ref = torch.full((T, n_out, n_in), 3.0, device=DEVICE)
    _, _, grads_ref = run("torch", x, w, b, packed, offsets, dy, ref)
    close(view, ref)
    assert view.data_ptr() == buffer.data_ptr() + before * buffer.element_size()
    assert torch.all(buffer[:, :before] == 3.0) and torch.all(buffer[:, before + n :] == 3.0)
    for got, want in zip(grads, grads_ref):
        close(got, want)


def test_task_grads_with_strided_rows_is_refused(rng):
    x, w, b, packed, offsets = make_case(rng, [3, 2], 16, 8)
    tg = torch.zeros(2, 16, 8, device=DEVICE).transpose(1, 2)  # [T, out, in] but column-major per task
    with pytest.raises(ValueError, match=r"task_grads\[t\] must be row-major contiguous"):
        run("triton", x, w, b, packed, offsets, torch.ones(5, 8, device=DEVICE), tg)


def test_without_task_grads_and_with_extra_dims(rng):
    # [B, L, in] input: offsets count sequences; no per-task buffer: the dW kernel splits rows, not tasks
    x, w, b, packed, offsets = make_case(rng, [3, 0, 4, 2], 40, 36, extra_dims=(5,))
    dy = torch.randn(x.shape[0], 5, 36, generator=rng).to(DEVICE)
    ran, y, grads = run("triton", x, w, b, packed, offsets, dy)
    assert ran == "triton" and y.shape == (9, 5, 36)
    _, y_ref, grads_ref = run("torch", x, w, b, packed, offsets, dy)
    close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        close(got, want)


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_some_inputs_need_gradients(grads, rng):
    x, w, b, packed, offsets = make_case(rng, [4, 7], 24, 20)
    dy = torch.randn(11, 20, generator=rng).to(DEVICE)
    _, y, got = run("triton", x, w, b, packed, offsets, dy, grads=grads)
    _, y_ref, want = run("torch", x, w, b, packed, offsets, dy, grads=grads)
    close(y, y_ref)
    for g, r, needed in zip(got, want, grads):
        if needed:
            close(g, r)
        else:
            assert g is None


def test_all_ones_mask_is_linear_and_all_zeros_is_bias(rng):
    x = torch.randn(13, 40, generator=rng).to(DEVICE)
    w = torch.randn(24, 40, generator=rng).to(DEVICE)
    b = torch.randn(24, generator=rng).to(DEVICE)
    packed = hf.ops.pack_masks(torch.stack([torch.ones(24 * 40, dtype=torch.bool),
                                            torch.zeros(24 * 40, dtype=torch.bool)])).to(DEVICE)
    y = hf.ops.masked_linear(x, w, b, packed, [0, 8, 13], backend="triton")
    close(y[:8], F.linear(x[:8], w, b))
    assert torch.equal(y[8:], b.expand(5, 24))


def test_no_rows_at_all(rng):
    x, w, b, packed, offsets = make_case(rng, [0, 0], 20, 12)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    tg = torch.zeros(2, 12, 20, device=DEVICE)
    y = hf.ops.masked_linear(leaves[0], leaves[1], leaves[2], packed, offsets, backend="triton", task_grads=tg)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.all(leaves[1].grad == 0) and torch.all(leaves[2].grad == 0) and torch.all(tg == 0)


def test_registered_ops_pass_opcheck(rng):
    """The torch.library ops: schema, fake (meta) implementations and the mutation of task_grads are consistent,
    which is what torch.compile relies on."""
    from harmodt_fast.kernels.masked_linear import masked_dw_op, masked_mm_op

    x, w, b, packed, offsets = make_case(rng, [5, 0, 6], 20, 17)
    dy = torch.randn(11, 17, generator=rng).to(DEVICE)
    tg = torch.zeros(3, 17, 20, device=DEVICE)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(masked_mm_op, (x, w, packed, offsets, b, None, True, 0, 0, False), test_utils=checks)
    torch.library.opcheck(masked_mm_op, (dy, w, packed, offsets, None, None, False, 0, 0, False), test_utils=checks)
    torch.library.opcheck(masked_dw_op, (dy, x, packed, offsets, tg, True, True, torch.float32), test_utils=checks)


def test_torch_compile_traces_the_op(rng):
    x, w, b, packed, offsets = make_case(rng, [4, 0, 7], 24, 20)
    dy = torch.randn(11, 20, generator=rng).to(DEVICE)

    def f(x, w, b, task_grads):
        return torch.tanh(hf.ops.masked_linear(x, w, b, packed, offsets, backend="triton",
                                               task_grads=task_grads)) * 2.0

    compiled = torch.compile(f, backend="aot_eager")
    outs = []
    for fn in (compiled, f):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        tg = torch.zeros(3, 20, 24, device=DEVICE)
        y = fn(*leaves, tg)
        assert hf.ops.last_backend("masked_linear") == "triton"
        y.backward(dy)
        outs.append([y.detach(), tg] + [t.grad for t in leaves])
    assert outs[0][1].abs().sum() > 0
    for got, want in zip(*outs):
        close(got, want)


@pytest.mark.parametrize("counts,n_in,n_out", [CASES[0], CASES[4]])
def test_swapped_operand_variant(counts, n_in, n_out, rng, monkeypatch):
    """The GPU autotuner also tries SWAP=True (the transposed tile, masked weight as the register operand):
    check that variant on the forward and dX here."""
    import triton

    from harmodt_fast.kernels import masked_linear as kl

    cfg = kl._masked_mm_kernel.configs[0]
    monkeypatch.setattr(kl._masked_mm_kernel, "configs",
                        [triton.Config({**cfg.kwargs, "SWAP": True}, num_warps=cfg.num_warps)])
    x, w, b, packed, offsets = make_case(rng, counts, n_in, n_out)
    dy = torch.randn(x.shape[0], n_out, generator=rng).to(DEVICE)
    ran, y, grads = run("triton", x, w, b, packed, offsets, dy)
    assert ran == "triton"
    _, y_ref, grads_ref = run("torch", x, w, b, packed, offsets, dy)
    close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        close(got, want)


def test_every_code_changing_constexpr_is_in_the_autotune_key():
    """A constexpr missing from the key lets one variant's tuned config (e.g. without bias) be reused for another
    (with bias). Allowed outside the key: the tuned parameters themselves and constexprs fixed by key entries."""
    import inspect

    from harmodt_fast.kernels import masked_attention, masked_linear, masked_mlp

    derived = {"BLOCK_T": "T", "BLOCK_OUT": "D_OUT", "CONTIG": "BACKWARD", "BLOCK_D": "D", "BLOCK_L": "L"}
    kernels = {name: getattr(mod, name) for mod in (masked_linear, masked_mlp, masked_attention) for name in dir(mod)
               if type(getattr(mod, name)).__name__ == "Autotuner"}
    assert len(kernels) == 6
    for name, kernel in kernels.items():
        fn = kernel.fn
        while hasattr(fn, "fn"):
            fn = fn.fn
        constexprs = {n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}
        tuned = {k for cfg in kernel.configs for k in cfg.kwargs}
        missing = {c for c in constexprs - set(kernel.keys) - tuned
                   if not (c in derived and (derived[c] in kernel.keys or name == "_qkv_attn_kernel"))}
        assert not missing, f"{name}: constexprs {sorted(missing)} are not in the autotune key {kernel.keys}"
