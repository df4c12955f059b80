"""The mask update's host-side work kept off the host: the clip factors and the mask overlap in a number of device
ops that does not grow with the tasks, bit-for-bit factors whatever the grouping of the rows, and the "auto" size of
the update's task groups (mask_update_memory_mb None) as a pure function of the free memory, agreeing with hf.plan."""
from __future__ import annotations


import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.masks import OVERLAP_PIECE_BITS, TaskMasks
from harmodt_fast.ops.packing import popcount_rows
from harmodt_fast.task_gradients import (AUTO_FREE_FRACTION, DEFAULT_UPDATE_MB, _norm_pieces, clip_factors,
                                         update_group_size)
from helpers import OpCounter

SIZES = [3000, 777, 40000, 65]  # layers of awkward sizes: pieces of every length


def dispatched_ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return sum(counter.ops.values())


def test_clip_factors_ops_do_not_grow_with_the_rows():
    rows = {T: torch.randn(T, sum(SIZES), generator=torch.Generator().manual_seed(T)) for T in (2, 16)}
    counts = {T: dispatched_ops(lambda: clip_factors(r, 0.25, SIZES)) for T, r in rows.items()}
    assert counts[2] == counts[16], counts
    # a few ops per piece of the entries (the former loop dispatched 5 per row and piece: 320 here for 16 rows)
    assert counts[16] <= 20 * len(_norm_pieces(SIZES, 0, sum(SIZES))), counts


def test_mask_overlap_ops_do_not_grow_with_the_tasks():
    shapes = {"a": (40, 50), "b": (33, 7)}
    masks = {T: TaskMasks.erk(shapes, T, 0.5, seed=T) for T in (2, 16)}
    counts = {T: dispatched_ops(m.overlap) for T, m in masks.items()}
    assert counts[2] == counts[16], counts


@pytest.mark.parametrize("threads", [1, 2])
def test_clip_factors_do_not_depend_on_the_grouping_of_the_rows(threads):
    """Bit for bit, whatever the group (one row alone reduces differently from many in torch's whole-row sums),
    also for pieces cut at 2**20 entries and a shard that starts inside a layer."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        for sizes, offset, width in ((SIZES, 0, sum(SIZES)), ([5], 0, 5), ([1000, (1 << 20) + 70], 700, 1 << 20)):
            rows = torch.randn(6, width, generator=gen) * torch.rand(6, 1, generator=gen) * 3
            whole = clip_factors(rows, 0.25, sizes, offset)
            for group in (1, 2, 4):
                for first in range(0, 6, group):
                    assert torch.equal(clip_factors(rows[first:first + group], 0.25, sizes, offset),
                                       whole[first:first + group]), (sizes, group, first)
            norms = torch.linalg.vector_norm(rows.double(), dim=1)
            want = torch.clamp(0.25 / (norms.float() + 1e-6), max=1.0)
            torch.testing.assert_close(whole, want, rtol=1e-6, atol=0)
            assert whole.dtype == torch.float32 and (whole < 1).all()
    finally:
        torch.set_num_threads(before)


def test_clip_factors_leave_float64_rows_as_they_were():
    rows = torch.randn(3, 100, dtype=torch.float64)
    kept = rows.clone()
    clip_factors(rows, 0.25, [100])
    assert torch.equal(rows, kept)


def test_mask_overlap_counts_exactly_across_pieces():
    """A layer longer than one piece of unpacked bits: the counts (float32 per piece) are exact integers."""
    T = 64
    n = 2 * OVERLAP_PIECE_BITS // T + 1000  # three pieces
    gen = torch.Generator().manual_seed(1)
    density = torch.rand(T, 1, 1, generator=gen)
    masks = TaskMasks.from_dense({"w": torch.rand(T, n // 100 + 1, 100, generator=gen) < density,
                                  "v": torch.rand(T, 8, 9, generator=gen) < density})
    inter = torch.zeros(T, T, dtype=torch.int64)
    for name in masks.names:
        packed = masks.packed(name)
        for i in range(T):
            inter[i] += popcount_rows(packed[i:i + 1] & packed)
    counts = inter.diagonal()
    want = inter.double() / (counts[:, None] + counts[None, :] - inter).double()
    got = masks.overlap()
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    assert torch.equal(got, want)


def _config(**kw) -> HarmoDTConfig:
    return HarmoDTConfig(**{"num_tasks": 50, **kw})


def test_auto_group_size_is_a_pure_function_of_the_free_memory():
    P = 4_718_592  # the paper model's masked weights
    whole = 50 * P * 4  # the [T, P] float32 buffer: 900 MiB
    auto = _config(mask_update_memory_mb=None)
    # CUDA: every task whenever the whole buffer fits the safe share of the free memory
    assert update_group_size(auto, P, free_bytes=80 * 2**30) == 50
    assert update_group_size(auto, P, free_bytes=int(whole / AUTO_FREE_FRACTION)) == 50
    assert update_group_size(auto, P, free_bytes=int(whole / AUTO_FREE_FRACTION) - 1) == 49
    assert update_group_size(auto, P, free_bytes=int(10 * P * 4 / AUTO_FREE_FRACTION) + 3) == 10
    assert update_group_size(auto, P, free_bytes=1000) == 1  # at least one task
    # the CPU (no free memory given): today's 256 MB
    assert update_group_size(auto, P) == int(DEFAULT_UPDATE_MB * 2**20 // (4 * P)) == 14
    # a limit the user set wins, on either device
    assert update_group_size(_config(mask_update_memory_mb=1.0), P, free_bytes=80 * 2**30) == 1
    assert update_group_size(_config(mask_update_memory_mb=1e6), P) == 50
    assert update_group_size(_config(), P, free_bytes=80 * 2**30) == 50  # the default is auto
    assert update_group_size(_config(mask_update_memory_mb=256), P, free_bytes=80 * 2**30) == 14


def test_plan_agrees_with_the_auto_group_size():
    big = hf.plan("paper", 50, 8, device="cuda", device_memory="80GiB", mask_update_memory_mb=None)
    assert big.mask_update_group == 50 and "agreement_sample" not in big.mask_update
    assert big.mask_update["task_gradient_rows"] == 50 * big.masked_weights * 4
    small = hf.plan("paper", 50, 8, device="cuda", device_memory="1GiB", mask_update_memory_mb=None)
    config = HarmoDTConfig.from_preset("paper", num_tasks=50, batch_per_task=8, mask_update_memory_mb=None)
    free = small.device_memory - small.persistent_bytes  # what is free at an update: the persistent part aside
    assert 1 < small.mask_update_group == update_group_size(config, small.masked_weights, free) < 50
    cpu = hf.plan("paper", 50, 8, device="cpu", device_memory="80GiB", mask_update_memory_mb=None)
    assert cpu.mask_update_group == 14  # 256 MB off CUDA
    unknown = hf.plan("paper", 50, 8, device="cuda", mask_update_memory_mb=None)
    if unknown.device_memory is None:
        assert unknown.mask_update_group == 14 and any("auto" in n for n in unknown.notes)


def test_auto_is_a_config_value():
    assert HarmoDTConfig(mask_update_memory_mb=None).mask_update_memory_mb is None
    assert HarmoDTConfig.parse_value("mask_update_memory_mb", "none") is None
    assert HarmoDTConfig.parse_value("mask_update_memory_mb", "512") == 512.0
    with pytest.raises(ValueError, match=r"mask_update_memory_mb must be > 0 or None \(auto\), got -1"):
        HarmoDTConfig(mask_update_memory_mb=-1)
