"""The reference harmony mask update: a case worked by hand, then invariants on random inputs."""
import pytest
import torch

import harmodt_fast as hf


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
def test_hand_case(score, want):
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=1, gamma=10.0, score=score, backend="torch")
    assert hf.ops.last_backend("harmony_update") == "torch"
    assert active_sets(new, 4) == want
    assert stats["pruned"].tolist() == [1, 1] and stats["regrown"].tolist() == [1, 1]
    assert stats["mean_agreement"].tolist() == [0.25, 1.375]
    assert stats["conflict_fraction"].tolist() == [0.0, 0.0]


def test_k_zero_and_clamp():
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=0, backend="torch")
    assert torch.equal(new, MASKS) and stats["pruned"].tolist() == [0, 0]
    # task 0 has one inactive entry, task 1 two: k=5 is clamped to 1 and 2
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=5, backend="torch")
    assert stats["pruned"].tolist() == [1, 2]
    assert [len(s) for s in active_sets(new, 4)] == [3, 2]
    # k per task
    new, stats = hf.ops.harmony_update(WEIGHT, GRADS, MASKS, k=[0, 1], backend="torch")
    assert active_sets(new, 4) == [{0, 1, 2}, {1, 3}]


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
