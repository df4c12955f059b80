"""The C++ harmony update, the streaming form and the torch-ops device path against the reference op, and the
task-gradient cosine similarity against torch.nn.functional.cosine_similarity.

Masks must be identical bit for bit; the statistics agree to ~1e-12 (their sums are taken in another order)."""
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.ops import harmony as H

SHAPES = [(1, 50, 3), (4, 1000, 17), (9, 333, 40), (7, 4099, 64), (16, 20000, 100)]


def random_case(rng, T, P, density=0.6, dtype=torch.float32):
    grads = torch.randn(T, P, generator=rng).to(dtype)
    weight = torch.randn(P, generator=rng)
    dense = torch.rand(T, P, generator=rng) < density
    return weight, grads, hf.ops.pack_masks(dense)


def reference(weight, grads, masks, k, gamma, score):
    ks = H.check_harmony_args(weight, grads, masks, k, gamma, score)
    return H.harmony_update_torch(weight, grads, masks, ks, float(gamma), score)


def assert_same(got, want, grads):
    new, stats = got
    ref_new, ref_stats = want
    assert new.dtype == torch.int32 and new.shape == ref_new.shape
    assert torch.equal(new, ref_new), "masks differ from the reference"
    # mean agreement: a float64 sum over P in another order; bound its rounding by the sum of |a|
    gd = grads.double()
    scale = (gd.mean(0).abs() * gd.abs()).mean(1) + 1e-300
    for name in H.STAT_NAMES:
        assert stats[name].dtype == torch.float64 and stats[name].shape == ref_stats[name].shape
        err = (stats[name] - ref_stats[name]).abs()
        assert (err <= 1e-12 * ref_stats[name].abs() + 1e-12 * scale).all(), (name, stats[name], ref_stats[name])


def run_cpp(weight, grads, masks, k, gamma=10.0, score="fisher"):
    out = hf.ops.harmony_update(weight, grads, masks, k, gamma, score, backend="cpp")
    assert hf.ops.last_backend("harmony_update") == "cpp" and H.last_implementation() == "cpp"
    return out


@pytest.mark.parametrize("score", H.SCORES)
@pytest.mark.parametrize("T,P,k", SHAPES)
def test_cpp_matches_reference(cpp_ext, rng, score, T, P, k):
    weight, grads, masks = random_case(rng, T, P)
    gamma = float(torch.empty(()).uniform_(0.5, 20.0, generator=rng))
    assert_same(run_cpp(weight, grads, masks, k, gamma, score), reference(weight, grads, masks, k, gamma, score), grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("score", H.SCORES)
def test_cpp_grad_dtypes(cpp_ext, rng, dtype, score):
    weight, grads, masks = random_case(rng, 5, 3001, dtype=dtype)
    weight = weight.to(dtype)
    assert_same(run_cpp(weight, grads, masks, 25, 10.0, score), reference(weight, grads, masks, 25, 10.0, score), grads)


def test_cpp_many_threads_large_k(cpp_ext, rng):
    # enough sub-chunks for every thread, k large enough that the per-thread heaps must be merged with care,
    # per-task k, densities from nearly empty to nearly full
    T, P = 6, 60_001
    grads = torch.randn(T, P, generator=rng)
    weight = torch.randn(P, generator=rng)
    density = torch.tensor([0.02, 0.3, 0.5, 0.8, 0.97, 0.999])[:, None]
    masks = hf.ops.pack_masks(torch.rand(T, P, generator=rng) < density)
    k = [2000, 0, 8000, 1, 1200, 300]
    for score in H.SCORES:
        assert_same(run_cpp(weight, grads, masks, k, 10.0, score), reference(weight, grads, masks, k, 10.0, score),
                    grads)


def test_k_zero(cpp_ext, rng):
    weight, grads, masks = random_case(rng, 4, 999)
    new, stats = run_cpp(weight, grads, masks, 0)
    assert torch.equal(new, masks)
    assert stats["pruned"].tolist() == [0.0] * 4 and stats["regrown"].tolist() == [0.0] * 4
    assert_same((new, stats), reference(weight, grads, masks, 0, 10.0, "fisher"), grads)


def test_k_clamped_to_active_and_inactive_counts(cpp_ext, rng):
    T, P = 4, 130
    grads = torch.randn(T, P, generator=rng)
    weight = torch.randn(P, generator=rng)
    dense = torch.zeros(T, P, dtype=torch.bool)
    dense[0] = True  # no inactive entry: nothing can be regrown, so nothing is pruned
    dense[2, :3] = True  # 3 active
    dense[3] = torch.rand(P, generator=rng) < 0.5
    masks = hf.ops.pack_masks(dense)  # task 1: no active entry
    new, stats = run_cpp(weight, grads, masks, P)
    active = dense[3].sum().item()
    assert stats["pruned"].tolist() == [0, 0, 3, min(active, P - active)]
    assert_same((new, stats), reference(weight, grads, masks, P, 10.0, "fisher"), grads)
    # the task swaps its whole active set when k reaches both counts
    assert set(hf.ops.unpack_masks(new, P)[2].nonzero().flatten().tolist()).isdisjoint({0, 1, 2})


@pytest.mark.parametrize("score", H.SCORES)
def test_ties_go_to_the_lower_index(cpp_ext, rng, score):
    # few distinct values (and signed zeros) so that most keys tie
    T, P = 5, 2500
    grads = torch.randint(-2, 3, (T, P), generator=rng).float() * 0.5
    negative_zero = (grads == 0) & (torch.rand(T, P, generator=rng) < 0.5)
    grads = torch.where(negative_zero, torch.tensor(-0.0), grads)
    grads[:, :64] = 0.0  # entries where every task's gradient is 0: a = 0 for all, γa + s ties exactly
    weight = torch.randint(0, 3, (P,), generator=rng).float()
    masks = hf.ops.pack_masks(torch.rand(T, P, generator=rng) < 0.5)
    want = reference(weight, grads, masks, 300, 10.0, score)
    assert_same(run_cpp(weight, grads, masks, 300, 10.0, score), want, grads)
    # streamed in small chunks: keys equal to the best kept by earlier chunks must lose to them
    for backend in ("cpp", "torch"):
        stream = hf.ops.HarmonyStream(T, P, masks, 300, 10.0, score, backend=backend)
        for a in range(0, P, 37):
            stream.feed(weight[a : a + 37], grads[:, a : a + 37])
        assert torch.equal(stream.finish()[0], want[0]), backend
    # all gradients equal: every key ties, so the lowest-index active entries go and the lowest inactive come back
    flat = torch.full((T, P), 0.25)
    dense = hf.ops.unpack_masks(masks, P)
    new = hf.ops.unpack_masks(run_cpp(weight * 0, flat, masks, 7, 10.0, score)[0], P)
    for t in range(T):
        assert (dense[t] & ~new[t]).nonzero().flatten().tolist() == dense[t].nonzero().flatten()[:7].tolist()
        assert (~dense[t] & new[t]).nonzero().flatten().tolist() == (~dense[t]).nonzero().flatten()[:7].tolist()


def test_padding_bits_are_not_entries(cpp_ext, rng):
    T, P = 3, 70  # 3 words, 26 padding bits in the last
    weight, grads, masks = random_case(rng, T, P)
    dirty = masks.clone()
    dirty[:, -1] |= -(1 << 6)  # set every bit past P
    new, _ = run_cpp(weight, grads, dirty, 5)
    ref_new, _ = reference(weight, grads, dirty, 5, 10.0, "fisher")
    assert torch.equal(new, ref_new) and torch.equal(new, run_cpp(weight, grads, masks, 5)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_nonfinite_gradients_raise(cpp_ext, rng, bad, backend):
    weight, grads, masks = random_case(rng, 6, 5000)
    grads[2, 4321] = bad
    grads[4, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or inf for task\(s\) \[2, 4\]"):
        hf.ops.harmony_update(weight, grads, masks, 3, backend=backend)
    # an inf cancelling a -inf in the task sum is caught too
    grads = torch.randn(3, 100, generator=rng)
    grads[0, 5], grads[1, 5] = float("inf"), float("-inf")
    with pytest.raises(ValueError, match=r"for task\(s\) \[0, 1\]"):
        hf.ops.harmony_update(weight[:100], grads, masks[:3, :4], 3, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_nonfinite_weight(cpp_ext, rng, backend):
    weight, grads, masks = random_case(rng, 3, 700)
    weight[100] = float("nan")
    with pytest.raises(ValueError, match="weight_flat contains NaN or inf"):
        hf.ops.harmony_update(weight, grads, masks, 3, score="magnitude", backend=backend)
    # the weight is not read by the other scores
    assert_same(run_cpp(weight, grads, masks, 3, 10.0, "fisher"), reference(weight, grads, masks, 3, 10.0, "fisher"),
                grads)


def test_strided_and_noncontiguous_grads(cpp_ext, rng):
    T, P = 5, 3000
    buf = torch.randn(T, P + 500, generator=rng)
    grads = buf[:, 200 : 200 + P]  # strided rows, contiguous entries: read in place
    weight = torch.randn(P, generator=rng)
    masks = hf.ops.pack_masks(torch.rand(T, P, generator=rng) < 0.6)
    want = reference(weight, grads.contiguous(), masks, 33, 10.0, "fisher")
    assert_same(run_cpp(weight, grads, masks, 33), want, grads)
    transposed = grads.t().contiguous().t()  # column-major: copied
    assert_same(run_cpp(weight, transposed, masks, 33), want, grads)


def chunk_bounds(rng, P):
    cuts = sorted(set(torch.randint(0, P + 1, (12,), generator=rng).tolist()) | {0, P, min(P, 1), min(P, 33)})
    cuts.insert(3, cuts[2])  # one empty chunk
    return list(zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("score", H.SCORES)
def test_stream_equals_whole_vector(cpp_ext, rng, backend, score):
    T, P = 6, 7777
    grads_buf = torch.randn(T, P, generator=rng)  # the layer chunks are views of one [T, P] buffer
    weight, _, masks = random_case(rng, T, P)
    k = [0, 5, 90, 400, 1, 3000]
    whole = run_cpp(weight, grads_buf, masks, k, 10.0, score)
    stream = hf.ops.HarmonyStream(T, P, masks, k, 10.0, score, backend=backend)
    assert stream.backend == backend and hf.ops.last_backend("harmony_stream") == backend
    for a, b in chunk_bounds(rng, P):
        stream.feed(weight[a:b], grads_buf[:, a:b])
    assert stream.offset == P
    got = stream.finish()
    assert torch.equal(got[0], whole[0])
    assert_same(got, reference(weight, grads_buf, masks, k, 10.0, score), grads_buf)


def test_stream_bf16_chunks_auto_backend(cpp_ext, rng):
    T, P = 4, 2048 + 17
    weight, grads, masks = random_case(rng, T, P, dtype=torch.bfloat16)
    stream = hf.ops.HarmonyStream(T, P, masks, 50)
    assert stream.backend == "cpp"  # auto on CPU tensors
    for a in range(0, P, 500):
        stream.feed(weight[a : a + 500], grads[:, a : a + 500])
    assert_same(stream.finish(), reference(weight, grads, masks, 50, 10.0, "fisher"), grads)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_stream_misuse(cpp_ext, rng, backend):
    T, P = 3, 100
    weight, grads, masks = random_case(rng, T, P)
    s = hf.ops.HarmonyStream(T, P, masks, 2, backend=backend)
    s.feed(weight[:60], grads[:, :60])
    with pytest.raises(ValueError, match="60 of 100"):
        s.finish()
    with pytest.raises(ValueError, match="past total_P=100"):
        s.feed(weight[:41], grads[:, :41])
    with pytest.raises(ValueError, match=r"grads_chunk must be a floating tensor \[3, p\]"):
        s.feed(weight[:40], grads[:2, :40])
    with pytest.raises(ValueError, match="weight_chunk must be"):
        s.feed(weight[:39], grads[:, :40])
    s.feed(weight[60:], grads[:, 60:])
    s.finish()
    with pytest.raises(RuntimeError):
        s.feed(weight[:0], grads[:, :0])
    with pytest.raises(RuntimeError):
        s.finish()
    bad = grads.clone()
    bad[1, 70] = float("nan")
    s = hf.ops.HarmonyStream(T, P, masks, 2, backend=backend)
    s.feed(weight[:50], bad[:, :50])
    with pytest.raises(ValueError, match=r"NaN or inf for task\(s\) \[1\]"):
        s.feed(weight[50:], bad[:, 50:])
    with pytest.raises(RuntimeError):  # a failed stream is spent
        s.finish()
    with pytest.raises(ValueError, match=r"masks_packed must be int32 \[3, 4\]"):
        hf.ops.HarmonyStream(T, P, masks[:, :3], 2, backend=backend)
    with pytest.raises(ValueError, match="non-negative"):
        hf.ops.HarmonyStream(T, P, masks, [1, -1, 0], backend=backend)


@pytest.mark.parametrize("score", H.SCORES)
def test_device_path_matches_reference(rng, score):
    # the torch-ops path that CUDA tensors take, run here on the CPU, in small pieces to cross piece boundaries
    T, P = 7, 5003
    weight, grads, masks = random_case(rng, T, P)
    grads[:, 100:200] = torch.randint(-1, 2, (T, 100), generator=rng).float()  # ties, signed zeros
    k = [0, 3, 40, 250, 1000, 2, 17]
    stream = H.TorchHarmonyStream(T, P, masks, k, 10.0, score, elements=T * 301)
    for a in range(0, P, 1200):
        stream.feed(weight[a : a + 1200], grads[:, a : a + 1200])
    assert_same(stream.finish(), reference(weight, grads, masks, k, 10.0, score), grads)
    got = H.harmony_update_device(weight, grads, masks, k, 10.0, score)
    assert torch.equal(got[0], reference(weight, grads, masks, k, 10.0, score)[0])


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


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("score", H.SCORES)
def test_cuda_torch_path_matches_cpu_reference(rng, score):
    # CUDA tensors take the torch-ops device path; it must give the CPU reference's masks bit for bit
    T, P = 12, 100_003
    weight, grads, masks = random_case(rng, T, P)
    grads[:, :500] = torch.randint(-1, 2, (T, 500), generator=rng).float()  # ties, zeros
    want = reference(weight, grads, masks, 300, 10.0, score)
    dev = torch.device("cuda")
    w_d, g_d, m_d = weight.to(dev), grads.to(dev), masks.to(dev)
    got = hf.ops.harmony_update(w_d, g_d, m_d, 300, 10.0, score)
    assert hf.ops.last_backend("harmony_update") == "torch" and H.last_implementation() == "torch-device"
    assert got[0].device == g_d.device
    assert_same((got[0].cpu(), got[1]), want, grads)
    # the reference itself on the device, and the bf16 gradients
    assert torch.equal(H.harmony_update_torch(w_d, g_d, m_d, [300] * T, 10.0, score)[0].cpu(), want[0])
    bf = grads.bfloat16()
    assert torch.equal(hf.ops.harmony_update(w_d, bf.to(dev), m_d, 300, 10.0, score)[0].cpu(),
                       reference(weight, bf, masks, 300, 10.0, score)[0])
    stream = hf.ops.HarmonyStream(T, P, m_d, 300, 10.0, score)
    assert stream.backend == "torch"
    for a, b in chunk_bounds(rng, P):
        stream.feed(w_d[a:b], g_d[:, a:b])
    assert torch.equal(stream.finish()[0].cpu(), want[0])
    g_d[3, 77] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf for task\(s\) \[3\]"):
        hf.ops.harmony_update(w_d, g_d, m_d, 300, 10.0, score)


@requires_cuda
def test_cuda_task_agreement(rng):
    grads = torch.randn(20, 70_001, generator=rng)
    cos = hf.ops.task_agreement(grads.cuda())
    assert hf.ops.last_backend("task_agreement") == "torch" and cos.device.type == "cuda"
    torch.testing.assert_close(cos.cpu(), independent_cosine(grads), rtol=0, atol=1e-12)
