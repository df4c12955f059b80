"""GPU-only: the Triton kernels at real HarmoDT shapes, in bf16 (and fp16 / fp32 at one shape), against an fp64
reference computed on the GPU from the same (already rounded) inputs. Every kernel output starts as NaN
(_common.POISON), so an element a kernel never writes fails the test instead of passing with stale memory.
Skipped without CUDA; `benchmarks/gpu_run.sh` runs them on the GPU machine.

Error measure: ||got - ref|| / ||ref|| (Frobenius, in fp64). bf16 keeps 8 significant bits, so a correctly rounded
result is within ~2^-9 per element; the bounds leave room for fp32 accumulation order and nothing more.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import harmodt_fast as hf
from harmodt_fast.batch import synthetic_batch
from harmodt_fast.ops.masked_attention import masked_attention_torch
from harmodt_fast.ops.masked_linear import masked_linear_torch
from helpers import dt_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
TASKS = 50
PAPER = [(256, 768), (256, 256), (256, 1024), (1024, 256)]  # (in, out) of the paper model's masked layers
LARGE = [(1024, 3072), (1024, 4096), (4096, 1024)]
BOUND = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    from harmodt_fast.kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


def rel_err(got, ref):
    assert not torch.isnan(got).any(), "NaN in the output: an element was never written (outputs are poisoned)"
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def counts_for(rng, tasks, mean):
    """Rows per task around `mean`, with some empty tasks and odd sizes."""
    c = torch.randint(0, 2 * mean + 1, (tasks,), generator=rng)
    c[torch.randperm(tasks, generator=rng)[: max(1, tasks // 10)]] = 0
    return c.tolist()


def linear_case(rng, counts, n_in, n_out, dtype, density=0.8):
    M = sum(counts)
    x = (torch.randn(M, n_in, generator=rng)).to(CUDA, dtype)
    w = (torch.randn(n_out, n_in, generator=rng) / math.sqrt(n_in)).to(CUDA, dtype)
    b = torch.randn(n_out, generator=rng).to(CUDA, dtype)
    packed = hf.ops.pack_masks(torch.rand(len(counts), n_out * n_in, generator=rng) < density).to(CUDA)
    offsets = [0] + torch.tensor(counts).cumsum(0).tolist()
    return x, w, b, packed, offsets


def check_masked_linear(rng, counts, n_in, n_out, dtype, with_task_grads):
    x, w, b, packed, offsets = linear_case(rng, counts, n_in, n_out, dtype)
    T = len(counts)
    dy = torch.randn(x.shape[0], n_out, generator=rng).to(CUDA, dtype)
    tg = torch.zeros(T, n_out, n_in, device=CUDA) if with_task_grads else None
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = hf.ops.masked_linear(*leaves, packed, offsets, backend="auto", task_grads=tg)
    assert hf.ops.last_backend("masked_linear") == "triton"
    y.backward(dy)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    tg_ref = torch.zeros(T, n_out, n_in, device=CUDA, dtype=torch.float64) if with_task_grads else None
    y_ref = masked_linear_torch(*ref_leaves, packed, tuple(offsets), tg_ref)
    y_ref.backward(dy.double())
    bound = BOUND[dtype]
    assert rel_err(y, y_ref) < bound
    for name, got, ref in zip(("dx", "dw", "db"), leaves, ref_leaves):
        assert rel_err(got.grad, ref.grad) < bound, name
    if with_task_grads:
        assert rel_err(tg, tg_ref) < 1e-4  # fp32 sums of exact bf16 products


@pytest.mark.parametrize("n_in,n_out", PAPER)
def test_gpu_masked_linear_paper_shapes_bf16(n_in, n_out, rng):
    check_masked_linear(rng, counts_for(rng, TASKS, 600), n_in, n_out, torch.bfloat16, with_task_grads=True)


@pytest.mark.parametrize("n_in,n_out", LARGE)
def test_gpu_masked_linear_large_shapes_bf16(n_in, n_out, rng):
    check_masked_linear(rng, counts_for(rng, TASKS, 120), n_in, n_out, torch.bfloat16, with_task_grads=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_masked_linear_other_dtypes(dtype, rng):
    check_masked_linear(rng, counts_for(rng, TASKS, 300), 256, 768, dtype, with_task_grads=True)


@pytest.mark.parametrize("n_in,n_out,tasks", [(200, 100, 7), (96, 1000, 1), (1000, 72, 64)])
def test_gpu_masked_linear_awkward_shapes(n_in, n_out, tasks, rng):
    # rows that are not whole mask words (200, 1000 % 32 != 0), one task, more tasks than the paper
    check_masked_linear(rng, counts_for(rng, tasks, 333), n_in, n_out, torch.bfloat16, with_task_grads=True)


def mlp_ref(x, w1, b1, m1, w2, b2, m2, offsets, act):
    f = F.relu if act == "relu" else F.gelu
    return masked_linear_torch(f(masked_linear_torch(x, w1, b1, m1, offsets, None)), w2, b2, m2, offsets, None)


@pytest.mark.parametrize("hidden,mlp,act", [(256, 1024, "relu"), (256, 1024, "gelu"), (1024, 4096, "relu")])
def test_gpu_masked_mlp_bf16(hidden, mlp, act, rng):
    counts = counts_for(rng, TASKS, 600 if hidden == 256 else 120)
    x, w1, b1, m1, offsets = linear_case(rng, counts, hidden, mlp, torch.bfloat16)
    _, w2, b2, m2, _ = linear_case(rng, counts, mlp, hidden, torch.bfloat16)
    dy = torch.randn(x.shape[0], hidden, generator=rng).to(CUDA, torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    y = hf.ops.masked_mlp(leaves[0], leaves[1], leaves[2], m1, leaves[3], leaves[4], m2, offsets, activation=act)
    assert hf.ops.last_backend("masked_mlp") == "triton"
    y.backward(dy)
    ref = [t.double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    y_ref = mlp_ref(ref[0], ref[1], ref[2], m1, ref[3], ref[4], m2, tuple(offsets), act)
    y_ref.backward(dy.double())
    # the hidden activations are rounded to bf16 between the two products (as an unfused bf16 MLP does)
    assert rel_err(y, y_ref) < 2 * BOUND[torch.bfloat16]
    for name, got, want in zip(("dx", "dw1", "db1", "dw2", "db2"), leaves, ref):
        assert rel_err(got.grad, want.grad) < 2 * BOUND[torch.bfloat16], name
    with torch.no_grad():  # inference: the chain kernel without storing the hidden activations
        y_inf = hf.ops.masked_mlp(x, w1, b1, m1, w2, b2, m2, offsets, activation=act)
    assert rel_err(y_inf, y_ref.detach()) < 2 * BOUND[torch.bfloat16]


@pytest.mark.parametrize("L,H,heads", [(75, 256, 8), (75, 1024, 16), (75, 1024, 8), (300, 256, 4)])
def test_gpu_masked_attention_bf16(L, H, heads, rng):
    counts = counts_for(rng, TASKS, 8 if H == 256 and L == 75 else 2)
    B = sum(counts)
    x, w, b, packed, offsets = linear_case(rng, counts, H, 3 * H, torch.bfloat16)
    x = x.view(B, 1, H).expand(B, L, H).contiguous() + 0.5 * torch.randn(B, L, H, device=CUDA, dtype=x.dtype)
    mask = dt_mask(rng, B, L, CUDA)
    dy = torch.randn(B, L, H, generator=rng).to(CUDA, torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    tg = torch.zeros(len(counts), 3 * H, H, device=CUDA)
    y = hf.ops.masked_attention(*leaves, packed, offsets, heads, attn_mask=mask, causal=True, task_grads=tg)
    assert hf.ops.last_backend("masked_attention") == "triton"
    y.backward(dy)
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    tg_ref = torch.zeros(len(counts), 3 * H, H, device=CUDA, dtype=torch.float64)
    from harmodt_fast.ops.masked_attention import attention_mask_3d

    y_ref = masked_attention_torch(*ref, packed, offsets, heads, attention_mask_3d(mask, B, L, CUDA), True, 0.0,
                                   tg_ref)
    y_ref.backward(dy.double())
    # q, k, v and the probabilities are rounded to bf16 before their products, as in any bf16 attention
    bound = 3 * BOUND[torch.bfloat16]
    assert rel_err(y, y_ref) < bound
    for name, got, want in zip(("dx", "dw", "db"), leaves, ref):
        assert rel_err(got.grad, want.grad) < bound, name
    assert rel_err(tg, tg_ref) < bound
    with torch.no_grad():  # inference: one kernel per (sequence, head) when L <= FUSED_MAX_L
        y_inf = hf.ops.masked_attention(x, w, b, packed, offsets, heads, attn_mask=mask, causal=True)
    assert rel_err(y_inf, y_ref.detach()) < bound


def test_gpu_attention_dropout_keep_rate_and_backward_consistency(rng):
    from harmodt_fast.kernels import masked_attention as kattn
    from harmodt_fast.ops.masked_attention import attention_mask_3d

    B, L, H, heads, p = 16, 75, 256, 8, 0.1
    x, w, b, packed, offsets = linear_case(rng, [8, 8], H, 3 * H, torch.float32)
    x = torch.randn(B, L, H, generator=rng).to(CUDA)
    mask3 = attention_mask_3d(dt_mask(rng, B, L, CUDA), B, L, CUDA)
    keep = kattn.dropout_keep_mask(77, B, heads, L, p, device=CUDA)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = kattn.masked_attention_triton(*leaves, packed, [0, 8, 16], heads, mask3, True, p, seed=77)
    D = H // heads
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    qkv = masked_linear_torch(ref[0].reshape(B * L, H), ref[1], ref[2], packed, (0, 8 * L, 16 * L), None)
    q, k, v = (t.reshape(B, L, heads, D).transpose(1, 2) for t in qkv.split(H, dim=1))
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask3[:, None], float("-inf"))
    y_ref = ((s.softmax(-1) * keep / (1 - p)) @ v).transpose(1, 2).reshape(B, L, H)
    assert rel_err(y.detach(), y_ref.detach()) < 1e-5
    dy = torch.randn(B, L, H, generator=rng).to(CUDA)
    y.backward(dy)
    y_ref.backward(dy.double())
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < 1e-5


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_gpu_model_triton_matches_torch(compiled, rng):
    cfg = hf.HarmoDTConfig.from_preset("paper", num_tasks=5, dropout=0.0, layers=2)
    torch.manual_seed(0)
    model = hf.HarmoDT(cfg).to(CUDA)
    batch = synthetic_batch(cfg, [8, 0, 5, 8, 3], rng, device=CUDA)
    losses, grads = {}, {}
    for backend in ("torch", "auto"):
        for layer in model.masked_layers().values():
            layer.backend = backend
        model.zero_grad()
        step = (lambda bt: model.task_losses(bt).sum())
        if compiled and backend == "auto":
            step = torch.compile(step)
        loss = step(batch)
        if backend == "auto" and not compiled:
            assert hf.ops.last_backend("masked_attention") == "triton"
            assert hf.ops.last_backend("masked_mlp") == "triton"
        loss.backward()
        losses[backend] = loss.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["auto"], losses["torch"], rtol=1e-4, atol=1e-6)
    for name, ref in grads["torch"].items():
        assert rel_err(grads["auto"][name], ref) < 1e-3, name
