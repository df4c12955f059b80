"""The harmony mask update (hf.ops.harmony_update): the reference's semantics (a case worked by hand, invariants on
random inputs), every backend and both row engines against the reference, the row engines fed in chunks, the
candidates' merge and write-back, the score table, and bad input.

Masks must be identical bit for bit; the statistics agree to ~1e-12 (their sums are taken in another order)."""
import functools

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.ops import harmony as H
from harmodt_fast.ops import harmony_rows as R

SCORES = tuple(H.SCORE_TABLE)
SHAPES = [(1, 50, 3), (4, 1000, 17), (9, 333, 40), (7, 4099, 64), (16, 20000, 100)]
ENGINES = ["cpp", "torch"]  # the row engines (HarmonyRows backends)


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


def run_torch_rows(weight, grads, masks, k, gamma=10.0, score="fisher", elements=None):
    """The whole-buffer update through the torch row engine (what CUDA tensors run), here on the CPU."""
    ks = H.check_harmony_args(weight, grads, masks, k, gamma, score, check_finite=False)
    engine = functools.partial(R._TorchRows, elements=elements)
    return R._whole_buffer(engine, weight, grads, masks, ks, float(gamma), score)


RUN = {"cpp": run_cpp, "torch": run_torch_rows}


def rows_in_chunks(engine, weight, grads, masks, k, gamma, score, bounds, gbar=None, group=None):
    """HarmonyRows fed consecutive chunks of entries (all T rows, ḡ summed by the engine; or with `gbar` given,
    `group` tasks at a time), applied to a copy of the masks."""
    T, P = grads.shape
    rows = HarmonyRowsChecked(T, P, masks, k, gamma, score, engine)
    for a, b in bounds:
        if gbar is None:
            rows.feed_rows(weight[a:b], grads[:, a:b], None, 0, a)
        else:
            for first in range(0, T, group):
                rows.feed_rows(weight[a:b], grads[first : first + group, a:b], gbar[a:b], first, a)
    new = masks.clone()
    if P % 32:
        new[:, -1] &= (1 << (P % 32)) - 1
    return new, R.apply_candidates([new], [P], rows.k, rows.candidates())


def HarmonyRowsChecked(T, P, masks, k, gamma, score, engine):
    rows = R.HarmonyRows(T, P, masks, k, gamma, score, backend=engine)
    assert rows.backend == engine and hf.ops.last_backend("harmony_rows") == engine
    return rows


def gbar_of(grads):
    gbar = grads[0].double().clone()
    for t in range(1, grads.shape[0]):
        gbar += grads[t].double()
    return gbar / torch.tensor(float(grads.shape[0]), dtype=torch.float64)


def chunk_bounds(rng, P):
    cuts = sorted(set(torch.randint(0, P + 1, (12,), generator=rng).tolist()) | {0, P, min(P, 1), min(P, 33)})
    cuts.insert(3, cuts[2])  # one empty chunk
    return list(zip(cuts[:-1], cuts[1:]))


# ---- the reference's semantics --------------------------------------------------------------------------------
def masks_from_sets(P, *active_sets):
    dense = torch.zeros(len(active_sets), P, dtype=torch.bool)
    for t, s in enumerate(active_sets):
        dense[t, list(s)] = True
    return hf.ops.pack_masks(dense)


def active_sets(packed, P):
    return [set(row.nonzero().flatten().tolist()) for row in hf.ops.unpack_masks(packed, P)]


# g0 = [1, -1, 2, 0], g1 = [1, 1, -2, 3] -> ḡ = [1, 0, 0, 1.5]; a0 = [1, 0, 0, 0], a1 = [1, 0, 0, 4.5]
GRADS = torch.tensor([[1.0, -1.0, 2.0, 0.0], [1.0, 1.0, -2.0, 3.0]])
WEIGHT = torch.tensor([0.5, 3.0, 0.1, 1.0])
MASKS = masks_from_sets(4, {0, 1, 2}, {0, 3})


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_ext")
    return request.param


@pytest.mark.parametrize(
    "score,want",
    [
        # task 0 prunes among {0,1,2}: 10a = [10,0,0] -> tie between 1 and 2, the lower index goes; regrows 3.
        # task 1 prunes among {0,3}: [10, 45] -> 0; regrows among {1,2} with a = [0,0] -> the lower index, 1.
        ("harmony", [{0, 2, 3}, {1, 3}]),
        # + g²: task 0 [11, 1, 4] -> prune 1; task 1 [11, 54] -> prune 0
        ("fisher", [{0, 2, 3}, {1, 3}]),
        # + |θ|: task 0 [10.5, 3, 0.1] -> prune 2; task 1 [10.5, 46] -> prune 0
        ("magnitude", [{0, 1, 3}, {1, 3}]),
    ],
)
def test_hand_case(backend, score, want):
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=1, gamma=10.0, score=score, backend=backend)
    assert hf.ops.last_backend("harmony_update") == backend
    assert H.last_implementation() == {"torch": "torch-reference", "cpp": "cpp"}[backend]
    assert active_sets(new, 4) == want
    assert stats["pruned"].tolist() == [1, 1] and stats["regrown"].tolist() == [1, 1]
    assert stats["mean_agreement"].tolist() == [0.25, 1.375]
    assert stats["conflict_fraction"].tolist() == [0.0, 0.0]


def test_k_zero_and_clamp(backend):
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=0, backend=backend)
    assert torch.equal(new, MASKS) and stats["pruned"].tolist() == [0, 0]
    # task 0 has one inactive entry, task 1 two: k=5 is clamped to 1 and 2
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=5, backend=backend)
    assert stats["pruned"].tolist() == [1, 2]
    assert [len(s) for s in active_sets(new, 4)] == [3, 2]
    # k per task
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=[0, 1], backend=backend)
    assert active_sets(new, 4) == [{0, 1, 2}, {1, 3}]
    assert hf.ops.last_backend("harmony_update") == backend


@pytest.mark.parametrize("score", ["fisher", "magnitude", "harmony"])
@pytest.mark.parametrize("T,P,k", [(1, 50, 3), (4, 1000, 17), (9, 333, 40)])
def test_invariants_random(score, T, P, k, rng):
    grads = torch.randn(T, P, generator=rng)
    weight = torch.randn(P, generator=rng)
    old = torch.rand(T, P, generator=rng) < 0.6
    new_packed, stats = hf.ops.harmony_update(weight, grads, hf.ops.pack_masks(old), k, 10.0, score, backend="torch")
    new = hf.ops.unpack_masks(new_packed, P)
    pruned, grown = old & ~new, ~old & new
    for t in range(T):
        k_t = min(k, int(old[t].sum()), int((~old[t]).sum()))
        assert int(pruned[t].sum()) == k_t == int(grown[t].sum()) == stats["pruned"][t]
        assert new[t].sum() == old[t].sum()  # density kept
    # the choice is the k best: every pruned score <= every kept active score, regrown a >= every other inactive a
    gbar = grads.double().mean(0)
    for t in range(T):
        a = gbar * grads[t].double()
        s = {"fisher": grads[t].double() ** 2, "magnitude": weight.double().abs(), "harmony": torch.zeros(P)}[score]
        prune_score = 10.0 * a + s
        if pruned[t].any():
            assert prune_score[pruned[t]].max() <= prune_score[old[t] & new[t]].min() + 1e-12
            assert a[grown[t]].min() >= a[~old[t] & ~new[t]].max() - 1e-12 if (~old[t] & ~new[t]).any() else True
        torch.testing.assert_close(stats["mean_agreement"][t], a.mean(), rtol=1e-9, atol=0)


def test_bf16_grads_accepted(rng):
    grads = torch.randn(3, 200, generator=rng)
    old = hf.ops.pack_masks(torch.rand(3, 200, generator=rng) < 0.5)
    w = torch.randn(200, generator=rng)
    a, _ = hf.ops.harmony_update(w, grads.bfloat16(), old, 5, backend="torch")
    b, _ = hf.ops.harmony_update(w, grads.bfloat16().float(), old, 5, backend="torch")
    assert torch.equal(a, b)


def test_bad_input():
    with pytest.raises(ValueError, match="NaN or inf for task"):
        g = GRADS.clone()
        g[1, 2] = float("nan")
        hf.ops.harmony_update(WEIGHT, g, MASKS, 1)
    with pytest.raises(ValueError, match="unknown score"):
        hf.ops.harmony_update(WEIGHT, GRADS, MASKS, 1, score="snip")
    with pytest.raises(ValueError, match=r"masks_packed must be int32 \[2, 1\]"):
        hf.ops.harmony_update(WEIGHT, GRADS, MASKS[:1], 1)
    with pytest.raises(ValueError, match="weight_flat must be"):
        hf.ops.harmony_update(WEIGHT[:3], GRADS, MASKS, 1)
    with pytest.raises(ValueError, match="non-negative"):
        hf.ops.harmony_update(WEIGHT, GRADS, MASKS, -1)


# ---- the row engines against the reference ----------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("T,P,k", SHAPES)
def test_engine_matches_reference(cpp_ext, rng, engine, score, T, P, k):
    weight, grads, masks = random_case(rng, T, P)
    gamma = float(torch.empty(()).uniform_(0.5, 20.0, generator=rng))
    want = reference(weight, grads, masks, k, gamma, score)
    assert_same(RUN[engine](weight, grads, masks, k, gamma, score), want, grads)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("score", SCORES)
def test_grad_dtypes(cpp_ext, rng, engine, dtype, score):
    weight, grads, masks = random_case(rng, 5, 3001, dtype=dtype)
    weight = weight.to(dtype)
    assert_same(RUN[engine](weight, grads, masks, 25, 10.0, score), reference(weight, grads, masks, 25, 10.0, score),
                grads)


def test_cpp_many_threads_large_k(cpp_ext, rng):
    # enough sub-chunks for every thread, k large enough that the per-thread heaps must be merged with care,
    # per-task k, densities from nearly empty to nearly full
    T, P = 6, 60_001
    grads = torch.randn(T, P, generator=rng)
    weight = torch.randn(P, generator=rng)
    density = torch.tensor([0.02, 0.3, 0.5, 0.8, 0.97, 0.999])[:, None]
    masks = hf.ops.pack_masks(torch.rand(T, P, generator=rng) < density)
    k = [2000, 0, 8000, 1, 1200, 300]
    for score in SCORES:
        assert_same(run_cpp(weight, grads, masks, k, 10.0, score), reference(weight, grads, masks, k, 10.0, score),
                    grads)


@pytest.mark.parametrize("engine", ENGINES)
def test_k_zero(cpp_ext, rng, engine):
    weight, grads, masks = random_case(rng, 4, 999)
    new, stats = RUN[engine](weight, grads, masks, 0)
    assert torch.equal(new, masks)
    assert stats["pruned"].tolist() == [0.0] * 4 and stats["regrown"].tolist() == [0.0] * 4
    assert_same((new, stats), reference(weight, grads, masks, 0, 10.0, "fisher"), grads)


@pytest.mark.parametrize("engine", ENGINES)
def test_k_clamped_to_active_and_inactive_counts(cpp_ext, rng, engine):
    T, P = 4, 130
    grads = torch.randn(T, P, generator=rng)
    weight = torch.randn(P, generator=rng)
    dense = torch.zeros(T, P, dtype=torch.bool)
    dense[0] = True  # no inactive entry: nothing can be regrown, so nothing is pruned
    dense[2, :3] = True  # 3 active
    dense[3] = torch.rand(P, generator=rng) < 0.5
    masks = hf.ops.pack_masks(dense)  # task 1: no active entry
    new, stats = RUN[engine](weight, grads, masks, P)
    active = dense[3].sum().item()
    assert stats["pruned"].tolist() == [0, 0, 3, min(active, P - active)]
    assert R.HarmonyRows(T, P, masks, P, backend=engine).k == [0, 0, 3, min(active, P - active)]
    assert_same((new, stats), reference(weight, grads, masks, P, 10.0, "fisher"), grads)
    # the task swaps its whole active set when k reaches both counts
    assert set(hf.ops.unpack_masks(new, P)[2].nonzero().flatten().tolist()).isdisjoint({0, 1, 2})


@pytest.mark.parametrize("score", SCORES)
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
    assert torch.equal(run_torch_rows(weight, grads, masks, 300, 10.0, score, elements=T * 301)[0], want[0])
    # fed in small chunks: keys equal to the best kept by earlier chunks must lose to them
    bounds = [(a, min(P, a + 37)) for a in range(0, P, 37)]
    for engine in ENGINES:
        got = rows_in_chunks(engine, weight, grads, masks, 300, 10.0, score, bounds)
        assert torch.equal(got[0], want[0]), engine
        got = rows_in_chunks(engine, weight, grads, masks, 300, 10.0, score, bounds, gbar=gbar_of(grads), group=2)
        assert torch.equal(got[0], want[0]), engine
    # all gradients equal: every key ties, so the lowest-index active entries go and the lowest inactive come back
    flat = torch.full((T, P), 0.25)
    dense = hf.ops.unpack_masks(masks, P)
    new = hf.ops.unpack_masks(run_cpp(weight * 0, flat, masks, 7, 10.0, score)[0], P)
    for t in range(T):
        assert (dense[t] & ~new[t]).nonzero().flatten().tolist() == dense[t].nonzero().flatten()[:7].tolist()
        assert (~dense[t] & new[t]).nonzero().flatten().tolist() == (~dense[t]).nonzero().flatten()[:7].tolist()


@pytest.mark.parametrize("engine", ENGINES)
def test_padding_bits_are_not_entries(cpp_ext, rng, engine):
    T, P = 3, 70  # 3 words, 26 padding bits in the last
    weight, grads, masks = random_case(rng, T, P)
    dirty = masks.clone()
    dirty[:, -1] |= -(1 << 6)  # set every bit past P
    new, _ = RUN[engine](weight, grads, dirty, 5)
    ref_new, _ = reference(weight, grads, dirty, 5, 10.0, "fisher")
    assert torch.equal(new, ref_new) and torch.equal(new, RUN[engine](weight, grads, masks, 5)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", ["cpp", "torch", "torch-rows"])
def test_nonfinite_gradients_raise(cpp_ext, rng, bad, backend):
    def update(weight, grads, masks, k):
        if backend == "torch-rows":
            return run_torch_rows(weight, grads, masks, k)
        return hf.ops.harmony_update(weight, grads, masks, k, backend=backend)

    weight, grads, masks = random_case(rng, 6, 5000)
    grads[2, 4321] = bad
    grads[4, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or inf for task\(s\) \[2, 4\]"):
        update(weight, grads, masks, 3)
    # an inf cancelling a -inf in the task sum is caught too
    grads = torch.randn(3, 100, generator=rng)
    grads[0, 5], grads[1, 5] = float("inf"), float("-inf")
    with pytest.raises(ValueError, match=r"for task\(s\) \[0, 1\]"):
        update(weight[:100], grads, masks[:3, :4], 3)


@pytest.mark.parametrize("engine", ENGINES)
def test_float64_sum_overflow_is_named(cpp_ext, engine):
    grads = torch.full((2, 40), 1e308, dtype=torch.float64)  # every entry finite, their sum is not
    masks = hf.ops.pack_masks(torch.rand(2, 40) < 0.5)
    with pytest.raises(ValueError, match="the sum of the task gradients overflows"):
        RUN[engine](torch.zeros(40), grads, masks, 3)


@pytest.mark.parametrize("backend", ["cpp", "torch", "torch-rows"])
def test_nonfinite_weight(cpp_ext, rng, backend):
    weight, grads, masks = random_case(rng, 3, 700)
    weight[100] = float("nan")
    with pytest.raises(ValueError, match="weight_flat contains NaN or inf"):
        if backend == "torch-rows":
            run_torch_rows(weight, grads, masks, 3, score="magnitude")
        else:
            hf.ops.harmony_update(weight, grads, masks, 3, score="magnitude", backend=backend)
    # the weight is not read by the other scores
    assert_same(run_cpp(weight, grads, masks, 3, 10.0, "fisher"), reference(weight, grads, masks, 3, 10.0, "fisher"),
                grads)
    assert_same(run_torch_rows(weight, grads, masks, 3), reference(weight, grads, masks, 3, 10.0, "fisher"), grads)


@pytest.mark.parametrize("engine", ENGINES)
def test_strided_and_noncontiguous_grads(cpp_ext, rng, engine):
    T, P = 5, 3000
    buf = torch.randn(T, P + 500, generator=rng)
    grads = buf[:, 200 : 200 + P]  # strided rows, contiguous entries: read in place
    weight = torch.randn(P, generator=rng)
    masks = hf.ops.pack_masks(torch.rand(T, P, generator=rng) < 0.6)
    want = reference(weight, grads.contiguous(), masks, 33, 10.0, "fisher")
    assert_same(RUN[engine](weight, grads, masks, 33), want, grads)
    transposed = grads.t().contiguous().t()  # column-major: copied
    assert_same(RUN[engine](weight, transposed, masks, 33), want, grads)


# ---- the row engines fed in chunks ------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("score", SCORES)
def test_chunks_equal_whole_buffer(cpp_ext, rng, engine, score):
    T, P = 6, 7777
    grads_buf = torch.randn(T, P, generator=rng)  # the layer chunks are views of one [T, P] buffer
    weight, _, masks = random_case(rng, T, P)
    k = [0, 5, 90, 400, 1, 3000]
    whole = run_cpp(weight, grads_buf, masks, k, 10.0, score)
    bounds = chunk_bounds(rng, P)
    got = rows_in_chunks(engine, weight, grads_buf, masks, k, 10.0, score, bounds)
    assert torch.equal(got[0], whole[0])
    assert_same(got, reference(weight, grads_buf, masks, k, 10.0, score), grads_buf)
    given = rows_in_chunks(engine, weight, grads_buf, masks, k, 10.0, score, bounds, gbar=gbar_of(grads_buf), group=4)
    assert_same(given, reference(weight, grads_buf, masks, k, 10.0, score), grads_buf)


def test_bf16_chunks_auto_backend(cpp_ext, rng):
    T, P = 4, 2048 + 17
    weight, grads, masks = random_case(rng, T, P, dtype=torch.bfloat16)
    rows = R.HarmonyRows(T, P, masks, 50)
    assert rows.backend == "cpp"  # auto on CPU tensors
    for a in range(0, P, 500):
        rows.feed_rows(weight[a : a + 500], grads[:, a : a + 500], None, 0, a)
    new = masks.clone()
    new[:, -1] &= (1 << (P % 32)) - 1
    stats = R.apply_candidates([new], [P], rows.k, rows.candidates())
    assert_same((new, stats), reference(weight, grads, masks, 50, 10.0, "fisher"), grads)


@pytest.mark.parametrize("score", SCORES)
def test_torch_engine_small_pieces(rng, score):
    # the torch engine (CUDA's), in small pieces to cross piece boundaries, fed in chunks
    T, P = 7, 5003
    weight, grads, masks = random_case(rng, T, P)
    grads[:, 100:200] = torch.randint(-1, 2, (T, 100), generator=rng).float()  # ties, signed zeros
    k = [0, 3, 40, 250, 1000, 2, 17]
    want = reference(weight, grads, masks, k, 10.0, score)
    rows = R._TorchRows(T, P, masks, k, 10.0, score, elements=T * 301)
    for a in range(0, P, 1200):
        rows.feed_rows(weight[a : a + 1200], grads[:, a : a + 1200], None, 0, a)
    new = masks.clone()
    assert_same((new, R.apply_candidates([new], [P], rows.k, rows.candidates())), want, grads)
    assert torch.equal(run_torch_rows(weight, grads, masks, k, 10.0, score)[0], want[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_misuse(cpp_ext, rng, engine):
    T, P = 3, 100
    weight, grads, masks = random_case(rng, T, P)
    s = R.HarmonyRows(T, P, masks, 2, backend=engine)
    s.feed_rows(weight[:60], grads[:, :60], None, 0, 0)
    with pytest.raises(ValueError, match=r"entries 60..101 are outside 0..100"):
        s.feed_rows(weight[:41], grads[:, :41], None, 0, 60)
    with pytest.raises(ValueError, match="without gbar the rows must be all 3 tasks"):
        s.feed_rows(weight[60:], grads[:2, 60:], None, 0, 60)
    with pytest.raises(ValueError, match="weight_chunk must be"):
        s.feed_rows(weight[:39], grads[:, 60:], None, 0, 60)
    with pytest.raises(ValueError, match="expects entries from 60"):
        s.feed_rows(weight[:40], grads[:, :40], None, 0, 0)
    s.feed_rows(weight[60:], grads[:, 60:], None, 0, 60)
    s.candidates()
    with pytest.raises(RuntimeError):
        s.feed_rows(weight[:0], grads[:, :0], None, 0, 100)
    with pytest.raises(RuntimeError):
        s.candidates()
    bad = grads.clone()
    bad[1, 70] = float("nan")
    s = R.HarmonyRows(T, P, masks, 2, backend=engine)
    s.feed_rows(weight[:50], bad[:, :50], None, 0, 0)
    with pytest.raises(ValueError, match=r"NaN or inf for task\(s\) \[1\]"):
        s.feed_rows(weight[50:], bad[:, 50:], None, 0, 50)
    with pytest.raises(RuntimeError):  # a failed feed spends the engine
        s.candidates()
    with pytest.raises(ValueError, match=r"masks_packed must be int32 \[3, 4\]"):
        R.HarmonyRows(T, P, masks[:, :3], 2, backend=engine)
    with pytest.raises(ValueError, match="non-negative"):
        R.HarmonyRows(T, P, masks, [1, -1, 0], backend=engine)


# ---- merging shards and writing the flips --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_merged_shards_and_split_write_back(cpp_ext, rng, engine):
    T, P = 5, 3001
    weight, grads, masks = random_case(rng, T, P)
    grads[:, :300] = torch.randint(-1, 2, (T, 300), generator=rng).float()  # ties across shard boundaries
    k = [4, 0, 60, 200, 9]
    want = reference(weight, grads, masks, k, 10.0, "fisher")
    gbar = gbar_of(grads)
    parts, ks = [], None
    for lo, hi in [(0, 150), (150, 151), (151, 1700), (1700, P)]:  # ranks' shards
        rows = R.HarmonyRows(T, P, masks, k, backend=engine)
        rows.feed_rows(weight[lo:hi], grads[:, lo:hi], gbar[lo:hi], 0, lo)
        ks = rows.k
        parts.append(rows.candidates())
    cands = R.merge_candidates(parts, ks)
    whole = R.HarmonyRows(T, P, masks, k, backend=engine)
    whole.feed_rows(weight, grads, None, 0, 0)
    single = whole.candidates()
    for t, k_t in enumerate(ks):  # the merged lists keep up to K = max k per task: each task's first k_t decide
        assert torch.equal(cands.prune_i[t, :k_t], single.prune_i[t, :k_t])
        assert torch.equal(cands.grow_i[t, :k_t], single.grow_i[t, :k_t])
    # the flips written into pieces of the entries (layers of 32-unaligned sizes) equal one flat write
    sizes = [37, 1000, 64, P - 1101]
    dense = hf.ops.unpack_masks(masks, P)
    layers, start = [], 0
    for n in sizes:
        layers.append(hf.ops.pack_masks(dense[:, start : start + n].contiguous()))
        start += n
    stats = R.apply_candidates(layers, sizes, ks, cands)
    joined = hf.ops.pack_masks(torch.cat([hf.ops.unpack_masks(m, n) for m, n in zip(layers, sizes)], dim=1))
    assert_same((joined, stats), want, grads)
    broken = R.Candidates(cands.prune_v, torch.full_like(cands.prune_i, -1), cands.grow_v, cands.grow_i,
                          cands.sum_a, cands.neg)
    with pytest.raises(RuntimeError, match="fewer candidates than its k"):
        R.apply_candidates([masks.clone()], [P], ks, broken)


# ---- the score table ---------------------------------------------------------------------------------------------
def test_the_cpp_score_ids_match_the_table(cpp_ext):
    assert H._check_cpp_score_ids(cpp_ext) is None
    assert dict(cpp_ext.score_ids()) == {s.name: s.cpp_id for s in H.SCORE_TABLE.values()}

    class Stale:
        @staticmethod
        def score_ids():
            return {"fisher": 0, "harmony": 1}

    assert "do not match the score table" in H._check_cpp_score_ids(Stale())
    assert "do not match the score table" in H._check_cpp_score_ids(object())  # no score_ids at all
    assert [H.score_needs_weight(n) for n in SCORES] == [False, True, False]


def test_a_score_added_to_the_table_runs_on_torch(cpp_ext, rng, monkeypatch):
    # s_t = |g_t|, with no C++ id: one entry in the table is all it takes
    monkeypatch.setitem(H.SCORE_TABLE, "abs_grad", H.Score("abs_grad", needs_weight=False, key=lambda g, w: g.abs(),
                                                           cpp_id=None))
    assert HarmoDTConfig(score="abs_grad").score == "abs_grad"
    T, P, k = 6, 3001, 40
    weight, grads, masks = random_case(rng, T, P)
    grads[:, :100] = torch.randint(-1, 2, (T, 100), generator=rng).float()  # ties
    want = reference(weight, grads, masks, k, 10.0, "abs_grad")
    # the key is |g|, not g² or 0: another selection than the built-in scores'
    assert not any(torch.equal(want[0], reference(weight, grads, masks, k, 10.0, s)[0]) for s in SCORES)
    got = hf.ops.harmony_update(weight, grads, masks, k, 10.0, "abs_grad")
    assert hf.ops.last_backend("harmony_update") == "torch"
    assert "does not implement score 'abs_grad'" in H.fallback_reason("harmony_update")
    assert_same(got, want, grads)
    assert_same(run_torch_rows(weight, grads, masks, k, 10.0, "abs_grad", elements=T * 301), want, grads)
    rows = R.HarmonyRows(T, P, masks, k, 10.0, "abs_grad")
    assert rows.backend == "torch" and "abs_grad" in H.fallback_reason("harmony_rows")
    with pytest.raises(RuntimeError, match="does not implement score 'abs_grad'"):
        hf.ops.harmony_update(weight, grads, masks, k, 10.0, "abs_grad", backend="cpp")
    # a score the C++ op has leaves no reason behind
    run_cpp(weight, grads, masks, k)
    hf.ops.harmony_update(weight, grads, masks, k)
    assert hf.ops.last_backend("harmony_update") == "cpp" and H.fallback_reason("harmony_update") is None


def test_the_table_is_restored():
    # runs after the test above (file order): monkeypatch put the table back
    assert tuple(H.SCORE_TABLE) == ("fisher", "magnitude", "harmony")
    with pytest.raises(ValueError, match="unknown score"):
        HarmoDTConfig(score="abs_grad")


# ---- CUDA ----------------------------------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("score", SCORES)
def test_cuda_torch_path_matches_cpu_reference(rng, score):
    # CUDA tensors take the torch row engine; it must give the CPU reference's masks bit for bit
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
    got = rows_in_chunks("torch", w_d, g_d, m_d, 300, 10.0, score, chunk_bounds(rng, P))
    assert torch.equal(got[0].cpu(), want[0])
    g_d[3, 77] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf for task\(s\) \[3\]"):
        hf.ops.harmony_update(w_d, g_d, m_d, 300, 10.0, score)
