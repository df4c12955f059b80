"""The Triton masked-matmul kernels against the plain-PyTorch reference op.

Without a GPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small fp32 shapes
chosen to be awkward: sizes that are not multiples of 16, empty segments, one task, many tasks, rows that span
several row tiles and several dW row splits, weight rows that are whole 32-bit mask words (the word-expansion
path) and rows that are not (the per-element path). The GPU versions at real shapes are in test_kernels_gpu.py.
"""
import pytest
import torch
import torch.nn.functional as F

import harmodt_fast as hf
from helpers import close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(rng, counts, n_in, n_out, T=None, density=0.7, extra_dims=()):
    T = T or len(counts)
    x = torch.randn(sum(counts), *extra_dims, n_in, generator=rng)
    w = torch.randn(n_out, n_in, generator=rng)
    b = torch.randn(n_out, generator=rng)
    dense = torch.rand(T, n_out * n_in, generator=rng) < density
    packed = hf.ops.pack_masks(dense)
    offsets = [0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(b), to(packed), offsets


def run(backend, x, w, b, packed, offsets, dy, task_grads=None, grads=(True, True, True)):
    leaves = [t.clone().requires_grad_(g) if t is not None else None for t, g in zip((x, w, b), grads)]
    y = hf.ops.masked_linear(leaves[0], leaves[1], leaves[2], packed, offsets, backend=backend,
                             task_grads=task_grads)
    ran = hf.ops.last_backend("masked_linear")
    if any(grads):
        y.backward(dy)
    return ran, y.detach(), [t.grad if t is not None else None for t in leaves]


CASES = [
    ([5, 0, 3], 17, 13),  # empty middle segment, odd sizes, per-element mask bits
    ([9], 33, 7),  # one task
    ([3, 1, 0, 4, 2, 5, 1], 20, 31),  # 7 tasks
    ([0, 0, 4], 16, 16),  # leading empty segments
    ([20, 0, 45, 3], 64, 96),  # whole-word mask bits, segments over several row tiles
    ([1] * 12, 32, 40),  # many tasks of one row
    ([70], 96, 24),  # one long segment: several dW row splits inside one task
]


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


@pytest.mark.parametrize("backend", ["triton", "cpp"])
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


def test_no_bias_and_fewer_segments_than_masks(rng):
    x, w, _, packed, offsets = make_case(rng, [6, 5], 19, 11, T=4)
    dy = torch.randn(11, 11, generator=rng).to(DEVICE)
    ran, y, grads = run("triton", x, w, None, packed, offsets, dy, grads=(True, True, False))
    assert ran == "triton"
    _, y_ref, grads_ref = run("torch", x, w, None, packed, offsets, dy, grads=(True, True, False))
    close(y, y_ref)
    close(grads[0], grads_ref[0])
    close(grads[1], grads_ref[1])


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
