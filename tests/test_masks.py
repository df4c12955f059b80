import math

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.masks import erk_densities
from harmodt_fast.method import flip_count

SHAPES = {"qkv": (96, 32), "proj": (32, 32), "fc": (128, 32), "out": (32, 128), "ln": (32,), "bias": (96,)}


def test_erk_densities_overall_and_dense_rules():
    dens = erk_densities(SHAPES, 0.8)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    overall = sum(dens[n] * numel[n] for n in SHAPES) / sum(numel.values())
    assert abs(overall - 0.8) < 1e-9
    assert dens["ln"] == 1.0 and dens["bias"] == 1.0
    assert all(0 < d <= 1 for d in dens.values())
    # ERK: density proportional to (n_in + n_out)/(n_in * n_out) among the sparse layers
    sparse = [n for n in SHAPES if dens[n] < 1]
    ratio = {n: dens[n] / (sum(SHAPES[n]) / math.prod(SHAPES[n])) for n in sparse}
    assert max(ratio.values()) == pytest.approx(min(ratio.values()))


def test_erk_masks_exact_counts_and_independent_tasks():
    masks = hf.TaskMasks.erk(SHAPES, num_tasks=3, density=0.8, seed=0)
    assert abs(masks.density() - 0.8) < 0.01
    for t in range(3):
        assert abs(masks.density(t) - 0.8) < 0.01
    assert masks.to_dense("ln").all() and masks.to_dense("bias").all()
    layer = masks.layer_density()
    want = erk_densities(SHAPES, 0.8)
    for n in SHAPES:
        assert layer[n] == pytest.approx(round(want[n] * math.prod(SHAPES[n])) / math.prod(SHAPES[n]))
    fc = masks.to_dense("fc")
    assert not torch.equal(fc[0], fc[1])  # tasks are drawn independently
    assert masks == hf.TaskMasks.erk(SHAPES, num_tasks=3, density=0.8, seed=0)  # seeded
    assert masks != hf.TaskMasks.erk(SHAPES, num_tasks=3, density=0.8, seed=1)


def test_from_dense_round_trip_state_dict_and_overlap(rng):
    dense = {"a": torch.rand(4, 5, 7, generator=rng) < 0.5, "b": torch.rand(4, 33, generator=rng) < 0.5}
    masks = hf.TaskMasks.from_dense(dense)
    for n in dense:
        assert torch.equal(masks.to_dense(n), dense[n])
        assert torch.equal(masks.to_dense(n, 2), dense[n][2])
    again = hf.TaskMasks.from_state_dict(masks.state_dict())
    assert again == masks
    flat = torch.cat([dense["a"].flatten(1), dense["b"].flatten(1)], 1).float()
    inter = flat @ flat.t()
    size = flat.sum(1)
    want = inter / (size[:, None] + size[None] - inter)
    torch.testing.assert_close(masks.overlap(), want.double())
    assert masks.nbytes == 4 * (2 + 2) * 4  # 35 bits -> 2 words; 33 bits -> 2 words; 4 tasks; 4 bytes a word
    assert masks.with_flat_packed(masks.flat_packed()) == masks


def test_flat_packed_word_aligned_fast_path(rng):
    masks = hf.TaskMasks.from_dense({"a": torch.rand(3, 4, 16, generator=rng) < 0.5,
                                     "b": torch.rand(3, 32, generator=rng) < 0.5})
    flat = masks.flat_packed()
    dense = torch.cat([masks.to_dense("a").flatten(1), masks.to_dense("b")], 1)
    assert torch.equal(flat, hf.ops.pack_masks(dense))
    assert masks.with_flat_packed(flat) == masks


def test_consensus():
    dense = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    masks = hf.TaskMasks.from_dense({"w": dense})
    assert masks.consensus(2).to_dense("w", 0).tolist() == [True, True, True, False]
    assert masks.consensus(3).to_dense("w", 0).tolist() == [True, False, False, False]
    with pytest.raises(ValueError):
        masks.consensus(4)


def test_flip_count_raised_cosine():
    assert flip_count(0, 1000) == 0
    assert flip_count(500, 1000) == 100
    assert flip_count(1000, 1000) == 0
    assert flip_count(250, 1000) == 50
    assert flip_count(250, 1000, eta_min=10, eta_max=50) == 30


def test_paper_mt50_mask_memory():
    """1 bit per weight per task: the paper model on MT50 needs ~30 MB (the published float32 masks ~1 GB)."""
    cfg = hf.HarmoDTConfig.from_preset("paper", num_tasks=50)
    with torch.device("meta"):
        model = hf.HarmoDT(hf.HarmoDTConfig.from_preset("paper", num_tasks=50, method="prompt-dt"))
    masks = hf.TaskMasks.erk(model, cfg.num_tasks, cfg.density, seed=0)
    print(f"paper MT50 masks: {masks.nbytes / 1e6:.2f} MB packed, {masks.numel} masked weights")
    assert 29e6 < masks.nbytes < 31e6
    assert abs(masks.density() - 0.8) < 0.001


@pytest.mark.parametrize("n,k", [(1, 0), (1, 1), (2, 1), (33, 20), (1000, 999), (4096, 1), (100_003, 80_002)])
def test_random_subset_has_exactly_k(n, k):
    import numpy as np

    from harmodt_fast.masks import random_subset

    chosen = random_subset(np.random.default_rng([n, k]), n, k)
    assert chosen.dtype == bool and chosen.shape == (n,) and int(chosen.sum()) == k


def test_random_subset_is_uniform():
    import numpy as np

    from harmodt_fast.masks import random_subset

    rng, n, k, draws = np.random.default_rng(0), 40, 10, 20_000
    freq = sum(random_subset(rng, n, k).astype(np.int64) for _ in range(draws)) / draws
    # every position is chosen with probability k/n = 0.25 (binomial sd 0.003 per position: 5 sd allowed)
    assert np.abs(freq - k / n).max() < 0.016
    pairs = {}
    for _ in range(4000):  # and every 2-subset of a 4-set equally often
        key = tuple(np.flatnonzero(random_subset(rng, 4, 2)))
        pairs[key] = pairs.get(key, 0) + 1
    assert len(pairs) == 6 and max(pairs.values()) - min(pairs.values()) < 200


def test_erk_masks_do_not_depend_on_the_thread_count(monkeypatch):
    import os

    many = hf.TaskMasks.erk(SHAPES, num_tasks=5, density=0.7, seed=3)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert hf.TaskMasks.erk(SHAPES, num_tasks=5, density=0.7, seed=3) == many
