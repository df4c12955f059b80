"""The harmony update's implementations: one row engine per backend, fed task rows, and the backends of
`harmony_update` (harmony.py) on top of them.

A row engine takes the task gradients as rows over consecutive entries and keeps, per task, only its best k prune
and regrow candidates (the specification is `harmony_update_torch` in harmony.py):

    rows = HarmonyRows(T, P, masks_packed, k, gamma, score)
    for first, grads in groups:                      # grads [G, p]: tasks first..first+G-1, entries offset..
        rows.feed_rows(weight_chunk, grads, gbar_chunk, first, offset)
    cands = rows.candidates()                        # per task, best first (a Candidates)
    stats = apply_candidates([masks_packed], [P], rows.k, cands)   # in place

ḡ = (1/T) Σ_t g_t is given (the streamed mask update sums it in a first pass over the task groups), or None when
the rows are all T tasks: the engine then sums it piece by piece, in cache. With the same ḡ and gradients this gives
exactly the masks of the reference (same keys, same float64 arithmetic, ties to the lower index). Data-parallel
ranks each feed their shard of the entries and `merge_candidates` combines their candidates exactly before
`apply_candidates`. `harmony_update` (the whole [T, P] buffer at once) is one feed of all T rows, then
`apply_candidates` on a copy of the masks; on CPU tensors its torch backend is the reference itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from harmodt_fast.ops._dispatch import register
from harmodt_fast.ops.harmony import (DEFAULT_GAMMA, DEFAULT_SCORE, SCORE_TABLE, _active_counts, _check_finite,
                                      _check_masks_k, _nonfinite_tasks, _stats_dict, harmony_update_torch,
                                      select_for_score)
from harmodt_fast.ops.packing import unpack_masks_torch


@dataclass
class Candidates:
    """Per task, the best candidates kept, lower key first, padded with NaN keys / -1 indices to K columns:
    prune keys are γ·a_t + s_t over active entries, regrow keys -a_t over inactive ones. sum_a and neg: the sums
    behind the statistics (Σ a_t and the count of a_t < 0 over the entries fed)."""

    prune_v: torch.Tensor  # [T, K] float64
    prune_i: torch.Tensor  # [T, K] int64
    grow_v: torch.Tensor  # [T, K] float64
    grow_i: torch.Tensor  # [T, K] int64
    sum_a: torch.Tensor  # [T] float64
    neg: torch.Tensor  # [T] int64


def _best(values: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], K: int):
    """Per row, the best K of the concatenated candidate lists by (key, index): lower key first, the lower index on
    equal keys, NaN keys (padding, index -1) last. The one top-k merge of the torch engine and of the ranks."""
    v, i = torch.cat(list(values), dim=1), torch.cat(list(indices), dim=1)
    by_index = torch.sort(torch.where(i < 0, torch.iinfo(torch.int64).max, i), dim=1, stable=True).indices
    v, i = v.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(v, dim=1, stable=True).indices[:, :K]  # NaN sorts last
    return v.gather(1, order), i.gather(1, order)


class _TorchRows:
    """The row engine from torch ops on the masks' device (CUDA, and the CPU): per piece of entries, the piece's
    best K candidates per task by (key, index) through a top-k, merged with the best K so far."""

    def __init__(self, num_tasks, total, masks_packed, ks, gamma, score, elements: int | None = None):
        self.T, self.P, self.masks, self.device = int(num_tasks), int(total), masks_packed, masks_packed.device
        self.gamma, self.score = float(gamma), SCORE_TABLE[score]
        counts = _active_counts(masks_packed, self.P)
        self.k = [min(k, c, self.P - c) for k, c in zip(ks, counts)]  # the documented clamp: density is kept
        self.K = max(self.k, default=0)
        self.elements = elements or (1 << (25 if self.device.type == "cuda" else 21))
        f64 = dict(dtype=torch.float64, device=self.device)
        nan = float("nan")
        self.prune = [torch.full((self.T, self.K), nan, **f64), torch.full((self.T, self.K), -1, dtype=torch.int64,
                                                                            device=self.device)]
        self.grow = [self.prune[0].clone(), self.prune[1].clone()]
        self.sum_a = torch.zeros(self.T, **f64)
        self.neg = torch.zeros(self.T, dtype=torch.int64, device=self.device)
        self.next = [-1] * self.T
        self._nan = torch.tensor(nan, **f64)
        self._T = torch.tensor(float(self.T), **f64)
        self.failed = False

    def feed_rows(self, weight, grads, gbar, first, offset):
        if self.failed:
            raise RuntimeError("HarmonyRows: an earlier feed failed; start a new one")
        G, n = grads.shape
        for t in range(first, first + G):
            if self.next[t] >= 0 and self.next[t] != offset:
                raise ValueError(f"HarmonyRows.feed_rows: task {t} expects entries from {self.next[t]}, got {offset}")
        piece = max(1, self.elements // max(G, 1))
        try:
            for s in range(0, n, piece):
                e = min(n, s + piece)
                self._feed(weight[s:e], grads[:, s:e], None if gbar is None else gbar[s:e], first, offset + s)
        except Exception:
            self.failed = True  # earlier pieces were taken: the candidates would be wrong
            raise
        for t in range(first, first + G):
            self.next[t] = offset + n

    def _feed(self, w, g, gbar, first, off):
        G, n = g.shape
        gd = g.to(torch.float64)
        if gbar is None:  # the rows are all T tasks: ḡ in the reference's order, then / T (a tensor divisor)
            gbar = gd[0].clone()
            for t in range(1, G):
                gbar += gd[t]
            gbar /= self._T
            finite = bool(torch.isfinite(gbar).all())  # the float64 sum is finite exactly when every entry is
        else:
            finite = bool(torch.isfinite(gd).all())
        if not finite:
            bad = [first + t for t in _nonfinite_tasks(g)]
            if not bad:
                raise ValueError(f"harmony_update: the sum of the task gradients overflows (entries {off}..{off + n})")
            raise ValueError(f"harmony_update: grads contain NaN or inf for task(s) {bad[:10]} (entries {off}..{off + n})")
        a = gbar * gd  # [G, n]
        rows = slice(first, first + G)
        self.sum_a[rows] += a.sum(dim=1)
        self.neg[rows] += (a < 0).sum(dim=1)
        if self.K == 0:
            return
        weight = None
        if self.score.needs_weight:
            weight = w.double()
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(f"harmony_update: weight_flat contains NaN or inf (entries {off}..{off + n})")
        score = self.gamma * a + self.score.key(gd, weight)  # γ·a_t + s_t, rounded as the reference rounds it
        w0, w1 = off // 32, (off + n - 1) // 32 + 1
        active = unpack_masks_torch(self.masks[rows, w0:w1], (w1 - w0) * 32)[:, off - 32 * w0 : off - 32 * w0 + n]
        idx = torch.arange(off, off + n, device=self.device)
        # "+ 0.0": -0.0 becomes +0.0, so that orderings agree with numeric equality
        self._merge(self.prune, rows, torch.where(active, score + 0.0, self._nan), idx)
        self._merge(self.grow, rows, torch.where(active, self._nan, -a + 0.0), idx)

    def _merge(self, kept, rows, key, idx):
        # the piece's best min(K, n) per task: keys below the k-th, then the lowest-index ones equal to it
        n = key.shape[1]
        kc = min(self.K, n)
        kth = torch.topk(key, kc, dim=1, largest=False, sorted=True).values[:, -1:]  # NaN sorts last
        below, equal = key < kth, key == kth
        take = below | (equal & (equal.cumsum(dim=1) <= kc - below.sum(dim=1, keepdim=True)))
        take = torch.where(torch.isnan(kth), ~torch.isnan(key), take)
        pos = take.cumsum(dim=1) - 1
        r, c = take.nonzero(as_tuple=True)
        new_v = torch.full((key.shape[0], kc), float("nan"), dtype=torch.float64, device=self.device)
        new_i = torch.full((key.shape[0], kc), -1, dtype=torch.int64, device=self.device)
        new_v[r, pos[r, c]], new_i[r, pos[r, c]] = key[r, c], idx[c]
        kept[0][rows], kept[1][rows] = _best([kept[0][rows], new_v], [kept[1][rows], new_i], self.K)

    def candidates(self) -> Candidates:
        if self.failed:
            raise RuntimeError("HarmonyRows: an earlier feed failed; start a new one")
        return Candidates(self.prune[0], self.prune[1], self.grow[0], self.grow[1], self.sum_a, self.neg)


class _CppRows:
    """harmodt_fast._C.HarmonyState (CPU tensors): one pass per feed, bounded per-task heaps."""

    def __init__(self, num_tasks, total, masks_packed, ks, gamma, score):
        from harmodt_fast._ext import load_extension

        self._state = load_extension().HarmonyState(int(total), masks_packed, list(ks), float(gamma),
                                                    SCORE_TABLE[score].cpp_id)
        self.k = list(self._state.k)

    def feed_rows(self, weight, grads, gbar, first, offset):
        self._state.feed_rows(weight, grads, gbar, int(first), int(offset))

    def candidates(self) -> Candidates:
        return Candidates(*self._state.candidates())


register("harmony_rows", "torch", "harmodt_fast.ops.harmony_rows:_TorchRows")
register("harmony_rows", "cpp", "harmodt_fast.ops.harmony_rows:_CppRows")

class HarmonyRows:
    """The harmony update fed task rows (see the module docstring). `k` are the flips each task will make
    (clamped to its active and inactive counts, from the whole masks)."""

    def __init__(self, num_tasks: int, total_P: int, masks_packed: torch.Tensor, k: int | Sequence[int],
                 gamma: float = DEFAULT_GAMMA, score: str = DEFAULT_SCORE, backend: str = "auto"):
        self.num_tasks, self.total = int(num_tasks), int(total_P)
        if self.total < 0:
            raise ValueError(f"HarmonyRows: total_P must be >= 0, got {total_P}")
        ks, gamma = _check_masks_k("HarmonyRows", self.num_tasks, self.total, masks_packed, k, gamma, score)
        self.backend, impl = select_for_score("harmony_rows", backend, masks_packed.device, score)
        self.device = masks_packed.device
        self._impl = impl(self.num_tasks, self.total, masks_packed, ks, gamma, score)
        self._done = False

    @property
    def k(self) -> list[int]:
        return list(self._impl.k)

    def feed_rows(self, weight_chunk: torch.Tensor, grads: torch.Tensor, gbar: torch.Tensor | None, first_task: int,
                  offset: int) -> None:
        """grads [G, p]: tasks first_task.. over entries offset..offset+p (rows may be strided); gbar float64 [p]:
        ḡ there (/ T), or None when grads are all T tasks (ḡ is then summed from them); weight_chunk [p]: the
        weights there (read only by a score that needs them; may be a stride-0 view)."""
        if self._done:
            raise RuntimeError("HarmonyRows: feed_rows() after candidates(); start a new one")
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or not grads.dtype.is_floating_point:
            raise ValueError(f"HarmonyRows.feed_rows: grads must be a floating tensor [G, p], "
                             f"got {getattr(grads, 'shape', grads)}")
        G, p = grads.shape
        if not 0 <= first_task <= first_task + G <= self.num_tasks:
            raise ValueError(f"HarmonyRows.feed_rows: tasks {first_task}..{first_task + G} are outside "
                             f"0..{self.num_tasks}")
        if not 0 <= offset <= offset + p <= self.total:
            raise ValueError(f"HarmonyRows.feed_rows: entries {offset}..{offset + p} are outside 0..{self.total}")
        if not isinstance(weight_chunk, torch.Tensor) or weight_chunk.shape != (p,) \
                or not weight_chunk.dtype.is_floating_point:
            raise ValueError(f"HarmonyRows.feed_rows: weight_chunk must be a floating tensor [{p}] to match grads "
                             f"{tuple(grads.shape)}, got {getattr(weight_chunk, 'shape', weight_chunk)}")
        if gbar is None:
            if (first_task, G) != (0, self.num_tasks):
                raise ValueError(f"HarmonyRows.feed_rows: without gbar the rows must be all {self.num_tasks} tasks, "
                                 f"got tasks {first_task}..{first_task + G}")
        elif gbar.shape != (p,) or gbar.dtype != torch.float64:
            raise ValueError(f"HarmonyRows.feed_rows: gbar must be float64 [{p}], got {tuple(gbar.shape)} {gbar.dtype}")
        devices = {grads.device, weight_chunk.device, self.device} | ({gbar.device} if gbar is not None else set())
        if len(devices) != 1:
            raise ValueError(f"HarmonyRows.feed_rows: every tensor must be on {self.device} (the masks' device)")
        self._impl.feed_rows(weight_chunk, grads, gbar, int(first_task), int(offset))

    def candidates(self) -> Candidates:
        """Ends the feeds: every task's kept candidates (a Candidates on the masks' device)."""
        if self._done:
            raise RuntimeError("HarmonyRows: candidates() called twice")
        self._done = True
        return self._impl.candidates()


def merge_candidates(parts: Sequence[Candidates], k: Sequence[int]) -> Candidates:
    """The candidates of shards of the entries (data-parallel ranks, in rank order) as one: per task the best k by
    (key, index), exactly the selection over all the entries."""
    K = max(k, default=0)
    prune_v, prune_i = _best([c.prune_v for c in parts], [c.prune_i for c in parts], K)
    grow_v, grow_i = _best([c.grow_v for c in parts], [c.grow_i for c in parts], K)
    sum_a = parts[0].sum_a.clone()
    neg = parts[0].neg.clone()
    for c in parts[1:]:
        sum_a += c.sum_a
        neg += c.neg
    return Candidates(prune_v, prune_i, grow_v, grow_i, sum_a, neg)


def apply_candidates(packed: Sequence[torch.Tensor], sizes: Sequence[int], k: Sequence[int],
                     cands: Candidates) -> dict[str, torch.Tensor]:
    """In place: each task's k best prune candidates off and its k best regrow candidates on, in the packed masks
    of consecutive pieces of the entries (`packed[j]` int32 [T, ceil(sizes[j]/32)], contiguous: the model's layers,
    or one flat tensor); returns the statistics of `harmony_update`. No copy of the masks is made."""
    T, P = packed[0].shape[0], int(sum(sizes))
    device = packed[0].device
    kt = torch.tensor([int(v) for v in k], dtype=torch.int64)
    K = int(kt.max()) if T else 0
    take = (torch.arange(K)[None, :] < kt[:, None]).to(device)  # [T, K]: each task's first k columns
    flips = torch.cat([cands.prune_i.to(device), cands.grow_i.to(device)], dim=1)  # [T, 2K]
    on = torch.cat([torch.zeros(T, K, dtype=torch.bool), torch.ones(T, K, dtype=torch.bool)], dim=1).to(device)
    chosen = torch.cat([take, take], dim=1)
    if bool((flips[chosen] < 0).any()):
        raise RuntimeError("harmony_update: internal error, a task kept fewer candidates than its k")
    task = torch.arange(T, device=device)[:, None].expand_as(flips)[chosen]
    index, on = flips[chosen], on[chosen]
    start = 0
    for masks, n in zip(packed, sizes):
        here = (index >= start) & (index < start + n)
        if bool(here.any()):
            local, turn_on = index[here] - start, on[here]
            flat = masks.view(-1)  # [T * W] words
            words, where = torch.unique(task[here] * masks.shape[1] + local // 32, return_inverse=True)
            # per word, the bits to clear and to set: a task's flips are distinct entries, so summing their bits
            # is OR-ing them (int64, no carries)
            bit = torch.ones_like(local) << (local % 32)
            clear = torch.zeros(words.numel(), dtype=torch.int64, device=device)
            clear.index_add_(0, where[~turn_on], bit[~turn_on])
            set_ = torch.zeros_like(clear).index_add_(0, where[turn_on], bit[turn_on])
            new = (flat[words].long() & 0xFFFFFFFF & ~clear) | set_  # the words as unsigned, in [0, 2**32)
            flat[words] = (new - ((new >> 31) << 32)).to(torch.int32)  # two's complement into int32's range
        start += n
    kd = kt.double()
    denominator = float(max(P, 1))
    stats = torch.stack([kd, kd, cands.sum_a.cpu().double() / denominator, cands.neg.cpu().double() / denominator])
    return _stats_dict(stats)


# --- the whole [T, P] buffer at once ------------------------------------------------------------------------------
def _whole_buffer(engine, weight_flat, grads, masks_packed, ks, gamma, score):
    """One feed of all T rows (ḡ summed by the engine), then the flips on a copy of the masks."""
    T, P = grads.shape
    rows = engine(T, P, masks_packed, ks, gamma, score)
    rows.feed_rows(weight_flat, grads, None, 0, 0)
    new = masks_packed.clone(memory_format=torch.contiguous_format)
    if P % 32:
        new[:, -1] &= (1 << (P % 32)) - 1  # the output's bits past P are 0, like pack_masks
    return new, apply_candidates([new], [P], rows.k, rows.candidates())


def _harmony_update_cpp(weight_flat, grads, masks_packed, ks, gamma, score):
    return _whole_buffer(_CppRows, weight_flat, grads, masks_packed, ks, gamma, score)


def _harmony_update_torch(weight_flat, grads, masks_packed, ks, gamma, score):
    if grads.device.type == "cpu":  # the specification itself: no faster torch form on the CPU
        _check_finite(weight_flat, grads, score)
        return harmony_update_torch(weight_flat, grads, masks_packed, ks, gamma, score)
    return _whole_buffer(_TorchRows, weight_flat, grads, masks_packed, ks, gamma, score)
