"""The Triton masked attention block (masked QKV projection + attention) against the reference: masked_linear
then scaled_dot_product_attention in plain PyTorch. Interpreter mode on small fp32 shapes without a GPU; block
size 16 there, so L > 16 crosses query/key blocks."""
import contextlib
import math

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.kernels import masked_attention as kattn
from harmodt_fast.ops.masked_attention import attention_mask_3d
from helpers import close, dt_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(rng, counts, L, H, T=None):
    T = T or len(counts)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    x = dev(torch.randn(sum(counts), L, H, generator=rng))
    w = dev(torch.randn(3 * H, H, generator=rng) / H**0.5)
    b = dev(torch.randn(3 * H, generator=rng) * 0.1)
    packed = dev(hf.ops.pack_masks(torch.rand(T, 3 * H * H, generator=rng) < 0.7))
    offsets = [0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()
    return (x, w, b), packed, offsets


def run(backend, leaves_in, packed, offsets, heads, dy=None, **kw):
    leaves = [t.clone().requires_grad_(dy is not None) for t in leaves_in]
    y = hf.ops.masked_attention(leaves[0], leaves[1], leaves[2], packed, offsets, heads, backend=backend, **kw)
    ran = hf.ops.last_backend("masked_attention")
    if dy is not None:
        y.backward(dy)
    return ran, y.detach(), [t.grad for t in leaves]


CASES = [  # counts, L, H, heads, mask kind, causal
    ([2, 0, 1], 7, 32, 2, "dt", True),  # one block; empty task segment
    ([2, 1], 37, 64, 2, "dt", True),  # three query/key blocks, whole-word mask bits
    ([1, 2], 20, 48, 3, None, True),  # causal without a mask tensor
    ([1, 1], 20, 40, 2, None, False),  # head dim 20 (padded to 32 in the kernel), no mask at all
    ([3], 18, 32, 1, "2d", False),  # one [L, L] mask for every sequence, one head
]


def build_mask(kind, rng, B, L):
    if kind == "dt":
        return dt_mask(rng, B, L, DEVICE)
    if kind == "2d":
        m = torch.rand(L, L, generator=rng) < 0.6
        return (m | torch.eye(L, dtype=torch.bool)).to(DEVICE)
    return None


@pytest.mark.parametrize("counts,L,H,heads,kind,causal", CASES)
def test_training_path_forward_and_gradients(counts, L, H, heads, kind, causal, rng):
    leaves, packed, offsets = make_case(rng, counts, L, H)
    B, T = sum(counts), len(counts)
    mask = build_mask(kind, rng, B, L)
    dy = torch.randn(B, L, H, generator=rng).to(DEVICE)
    tg = {be: torch.full((T, 3 * H, H), 0.5, device=DEVICE) for be in ("triton", "torch")}
    ran, y, grads = run("triton", leaves, packed, offsets, heads, dy, attn_mask=mask, causal=causal,
                        task_grads=tg["triton"])
    assert ran == "triton"
    _, y_ref, grads_ref = run("torch", leaves, packed, offsets, heads, dy, attn_mask=mask, causal=causal,
                              task_grads=tg["torch"])
    close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        close(got, want)
    close(tg["triton"], tg["torch"])


@pytest.mark.parametrize("fused", [True, False], ids=["one-kernel", "projection+attention"])
@pytest.mark.parametrize("counts,L,H,heads,kind,causal", CASES[:4])
def test_inference_paths(counts, L, H, heads, kind, causal, fused, rng, monkeypatch):
    if not fused:  # what sequences longer than FUSED_MAX_L take
        monkeypatch.setattr(kattn, "FUSED_MAX_L", 0)
    leaves, packed, offsets = make_case(rng, counts, L, H)
    mask = build_mask(kind, rng, sum(counts), L)
    with torch.no_grad():
        ran, y, _ = run("triton", leaves, packed, offsets, heads, attn_mask=mask, causal=causal)
        assert ran == "triton"
        _, y_ref, _ = run("torch", leaves, packed, offsets, heads, attn_mask=mask, causal=causal)
    close(y, y_ref)


@contextlib.contextmanager
def launch_args(*kernels):
    """The arguments (by parameter name) of every launch of `kernels` while open, recorded by Triton's pre-run
    hooks: the launches themselves run as usual."""
    seen = {k: [] for k in kernels}
    hooks = []
    for k in kernels:
        fn = getattr(k, "fn", k)  # an autotuned kernel wraps the jitted function

        def hook(*args, _k=k, _names=fn.arg_names, **kwargs):
            seen[_k].append({**dict(zip(_names, args)), **kwargs})

        fn.add_pre_run_hook(hook)
        hooks.append((fn, hook))
    try:
        yield seen
    finally:
        for fn, hook in hooks:
            fn.pre_run_hooks.remove(hook)


@pytest.mark.parametrize("seed", [1234, "tensor", None], ids=["int", "tensor", "drawn"])
def test_dropout_matches_reference_with_the_kernels_keep_mask(seed, rng):
    counts, L, H, heads, p = [2, 1], 21, 32, 2, 0.3
    (x, w, b), packed, offsets = make_case(rng, counts, L, H)
    B, D = 3, H // heads
    seed = torch.tensor([987], device=DEVICE) if seed == "tensor" else seed
    mask3 = attention_mask_3d(dt_mask(rng, B, L, DEVICE), B, L, x.device)
    dy = torch.randn(B, L, H, generator=rng).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with launch_args(kattn._attn_fwd_kernel, kattn._attn_bwd_kernel) as seen:
        y = kattn.masked_attention_triton(leaves[0], leaves[1], leaves[2], packed, offsets, heads, mask3, True, p,
                                          seed=seed)
        y.backward(dy)
    # the seed reaches both kernels as the same one-element int64 tensor (an int would be specialised by Triton:
    # a recompile for some draws, a constant baked into a CUDA graph); the backward reuses the forward's
    (fwd,), (bwd,) = seen[kattn._attn_fwd_kernel], seen[kattn._attn_bwd_kernel]
    seeds = [fwd["seed_ptr"], bwd["seed_ptr"]]
    assert all(isinstance(s, torch.Tensor) and s.dtype == torch.int64 and s.numel() == 1 for s in seeds)
    assert seeds[0].item() == seeds[1].item() == {1234: 1234, None: seeds[0].item()}.get(seed, 987)
    keep = kattn.dropout_keep_mask(seeds[0].item(), B, heads, L, p, device=x.device)
    assert torch.equal(keep, kattn.dropout_keep_mask(seeds[0].to(DEVICE), B, heads, L, p, device=x.device))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    # reference with the same keep-mask, written out by hand
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    qkv = hf.ops.masked_linear(ref[0], ref[1], ref[2], packed, offsets, backend="torch")
    q, k, v = (t.reshape(B, L, heads, D).transpose(1, 2) for t in qkv.split(H, dim=2))
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask3[:, None], float("-inf"))
    y_ref = ((s.softmax(-1) * keep / (1 - p)) @ v).transpose(1, 2).reshape(B, L, H)
    close(y.detach(), y_ref.detach())
    y_ref.backward(dy)
    for got, want in zip(leaves, ref):
        close(got.grad, want.grad)


def test_dropout_under_torch_compile(rng):
    """fullgraph (aot_eager) gives the eager outputs and gradients; the seed stays a tensor in the graph (no .item(),
    a host synchronisation) and a new seed value is a new input of the same graph, not a recompile."""
    (x, w, b), packed, offsets = make_case(rng, [2, 1], 9, 32)
    dy = torch.randn(3, 9, 32, generator=rng).to(DEVICE)

    def block(x, w, b, seed):
        return kattn.masked_attention_triton(x, w, b, packed, offsets, 2, None, True, 0.25, seed=seed)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []

    def aot_eager(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    compiled = torch.compile(block, backend=aot_eager, fullgraph=True)
    outs = []
    for seed in (55, 56):
        results = []
        for fn in (block, compiled):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            y = fn(*leaves, torch.tensor([seed], device=DEVICE))
            y.backward(dy)
            results.append([y.detach()] + [t.grad for t in leaves])
        for got, want in zip(*results):
            close(got, want)
        outs.append(results[1][0])
    assert not torch.equal(outs[0], outs[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(graphs) == 1
    assert not [n for n in graphs[0].graph.nodes if n.target == "item"]


def test_attention_ops_pass_opcheck(rng):
    (x, w, b), packed, offsets = make_case(rng, [2, 1], 9, 32)
    B, L, H, heads = 3, 9, 32, 2
    qkv = torch.randn(B * L, 3 * H, generator=rng).to(DEVICE)
    mbits = kattn.pack_attention_mask(attention_mask_3d(dt_mask(rng, B, L, DEVICE), B, L, qkv.device))
    checks = ("test_schema", "test_faketensor")
    dout = torch.randn(B * L, H, generator=rng).to(DEVICE)
    for p, seed in [(0.0, None), (0.2, kattn.seed_tensor(7, qkv.device))]:
        torch.library.opcheck(kattn.attention_fwd_op, (qkv, mbits, B, L, heads, True, p, seed), test_utils=checks)
        out, lse = kattn.attention_fwd_op(qkv, mbits, B, L, heads, True, p, seed)
        torch.library.opcheck(kattn.attention_bwd_op, (dout, qkv, out, lse, mbits, B, L, heads, True, p, seed),
                              test_utils=checks)
    torch.library.opcheck(kattn.masked_qkv_attention_op,
                          (x.reshape(B * L, H), w, b, packed, offsets, mbits, B, L, heads, True), test_utils=checks)


def test_packed_attention_mask_layout(rng):
    m = torch.rand(4, 37, 37, generator=rng) < 0.5
    bits = kattn.pack_attention_mask(m.to(DEVICE))
    assert bits.shape == (4, 37, 2) and bits.dtype == torch.int32
    assert torch.equal(hf.ops.unpack_masks(bits.reshape(4 * 37, 2).cpu(), 37).view(4, 37, 37), m)
    shared = kattn.pack_attention_mask(m[:1].expand(4, 37, 37).to(DEVICE))  # a broadcast mask is packed once
    assert shared.shape == (1, 37, 2)


def test_attention_bad_input(rng):
    (x, w, b), packed, offsets = make_case(rng, [2, 1], 9, 32)
    with pytest.raises(ValueError, match="multiple of heads"):
        hf.ops.masked_attention(x, w, b, packed, offsets, 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        hf.ops.masked_attention(x, w, b, packed, offsets, 2, attn_mask=torch.ones(3, 1, 9, 8, dtype=torch.bool,
                                                                                       device=DEVICE))
    with pytest.raises(ValueError, match="bool"):
        hf.ops.masked_attention(x, w, b, packed, offsets, 2, attn_mask=torch.ones(9, 9, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        hf.ops.masked_attention(x, w, b, packed, offsets, 2, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"weight must be \[96, 32\]"):
        hf.ops.masked_attention(x, w[:64], b, packed, offsets, 2)
