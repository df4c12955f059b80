"""The harmony update fed by task rows, for the streamed mask update (harmodt_fast/method.py).

`harmony_update` needs every task's gradient at once ([T, P]); here a task group's rows arrive one group at a
time, with the harmony gradient ḡ = (1/T) Σ_t g_t given (the caller sums it in a first pass over the groups), and
each task keeps only its best k prune and regrow candidates:

    rows = HarmonyRows(T, P, masks_packed, k, gamma, score)
    for first, grads in groups:                      # grads [G, p]: tasks first..first+G-1, entries offset..
        rows.feed_rows(weight_chunk, grads, gbar_chunk, first, offset)
    cands = rows.candidates()                        # per task, best first (a Candidates)
    stats = apply_candidates([masks_packed], [P], rows.k, cands)   # in place

With the same ḡ and gradients this gives exactly the masks of `harmony_update` (same keys, same float64
arithmetic, ties to the lower index). Data-parallel ranks each feed their shard of the entries and
`merge_candidates` combines their candidates exactly before `apply_candidates`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from harmodt_fast.ops._dispatch import register, select
from harmodt_fast.ops.harmony import (SCORES, _active_counts, _check_masks_k, _nonfinite_tasks, _stats_dict,
                                      prune_scores)
from harmodt_fast.ops.packing import pack_masks_torch, unpack_masks_torch


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



class _TorchRows:
    """Row mode from torch ops on the masks' device (CUDA, and the CPU reference): per piece of entries, the
    piece's best K candidates per task by (key, index) through a top-k, merged with the best K so far."""

    def __init__(self, num_tasks, total, masks_packed, ks, gamma, score, elements: int | None = None):
        self.T, self.P, self.masks, self.device = int(num_tasks), int(total), masks_packed, masks_packed.device
        self.gamma, self.score = float(gamma), score
        counts = _active_counts(masks_packed, self.P)
        self.k = [min(k, c, self.P - c) for k, c in zip(ks, counts)]
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

    def feed_rows(self, weight, grads, gbar, first, offset):
        G, n = grads.shape
        for t in range(first, first + G):
            if self.next[t] >= 0 and self.next[t] != offset:
                raise ValueError(f"HarmonyRows.feed_rows: task {t} expects entries from {self.next[t]}, got {offset}")
        piece = max(1, self.elements // max(G, 1))
        for s in range(0, n, piece):
            e = min(n, s + piece)
            self._feed(weight[s:e], grads[:, s:e], gbar[s:e], first, offset + s)
        for t in range(first, first + G):
            self.next[t] = offset + n

    def _feed(self, w, g, gbar, first, off):
        G, n = g.shape
        gd = g.to(torch.float64)
        if not bool(torch.isfinite(gd).all()):
            bad = [first + t for t in _nonfinite_tasks(g)]
            raise ValueError(f"harmony_update: grads contain NaN or inf for task(s) {bad[:10]} (entries {off}..{off + n})")
        a = gbar * gd  # [G, n]
        rows = slice(first, first + G)
        self.sum_a[rows] += a.sum(dim=1)
        self.neg[rows] += (a < 0).sum(dim=1)
        if self.K == 0:
            return
        score = prune_scores(self.score, self.gamma, a, gd, w, off)
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
        # kept candidates have lower indices and come first: a stable sort by key keeps index order on ties
        all_v, all_i = torch.cat([kept[0][rows], new_v], dim=1), torch.cat([kept[1][rows], new_i], dim=1)
        order = torch.sort(all_v, dim=1, stable=True).indices[:, : self.K]
        kept[0][rows], kept[1][rows] = all_v.gather(1, order), all_i.gather(1, order)

    def candidates(self) -> Candidates:
        return Candidates(self.prune[0], self.prune[1], self.grow[0], self.grow[1], self.sum_a, self.neg)


class _CppRows:
    """harmodt_fast._C.HarmonyState in row mode (CPU tensors): one pass per feed, bounded per-task heaps."""

    def __init__(self, num_tasks, total, masks_packed, ks, gamma, score):
        from harmodt_fast._ext import load_extension

        self._state = load_extension().HarmonyState(int(total), masks_packed, list(ks), float(gamma),
                                                    SCORES.index(score))
        self.k = list(self._state.k)

    def feed_rows(self, weight, grads, gbar, first, offset):
        self._state.feed_rows(weight, grads, gbar, int(first), int(offset))

    def candidates(self) -> Candidates:
        return Candidates(*self._state.candidates())


register("harmony_rows", "torch", "harmodt_fast.ops.harmony_rows:_TorchRows")
register("harmony_rows", "cpp", "harmodt_fast.ops.harmony_rows:_CppRows")


class HarmonyRows:
    """The harmony update fed task rows with ḡ given (see the module docstring). `k` are the flips each task
    will make (clamped to its active and inactive counts, from the whole masks)."""

    def __init__(self, num_tasks: int, total_P: int, masks_packed: torch.Tensor, k: int | Sequence[int],
                 gamma: float = 10.0, score: str = "fisher", backend: str = "auto"):
        self.num_tasks, self.total = int(num_tasks), int(total_P)
        ks, gamma = _check_masks_k("HarmonyRows", self.num_tasks, self.total, masks_packed, k, gamma, score)
        self.backend, impl = select("harmony_rows", backend, masks_packed.device)
        self.device = masks_packed.device
        self._impl = impl(self.num_tasks, self.total, masks_packed, ks, gamma, score)
        self._done = False

    @property
    def k(self) -> list[int]:
        return list(self._impl.k)

    def feed_rows(self, weight_chunk: torch.Tensor, grads: torch.Tensor, gbar: torch.Tensor, first_task: int,
                  offset: int) -> None:
        """grads [G, p]: tasks first_task.. over entries offset..offset+p; gbar float64 [p]: ḡ there (/ T);
        weight_chunk [p]: the weights there (read for the "magnitude" score only; may be a stride-0 view)."""
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
        if gbar.shape != (p,) or gbar.dtype != torch.float64 or weight_chunk.shape != (p,):
            raise ValueError(f"HarmonyRows.feed_rows: gbar must be float64 [{p}] and weight_chunk [{p}], got "
                             f"{tuple(gbar.shape)} {gbar.dtype} and {tuple(weight_chunk.shape)}")
        if len({grads.device, gbar.device, weight_chunk.device, self.device}) != 1:
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

    def best(values, indices):
        v, i = torch.cat(values, dim=1), torch.cat(indices, dim=1)
        by_index = torch.sort(torch.where(i < 0, torch.iinfo(torch.int64).max, i), dim=1, stable=True).indices
        v, i = v.gather(1, by_index), i.gather(1, by_index)
        order = torch.sort(v, dim=1, stable=True).indices[:, :K]  # NaN (padding) sorts last
        return v.gather(1, order), i.gather(1, order)

    prune_v, prune_i = best([c.prune_v for c in parts], [c.prune_i for c in parts])
    grow_v, grow_i = best([c.grow_v for c in parts], [c.grow_i for c in parts])
    sum_a = parts[0].sum_a.clone()
    neg = parts[0].neg.clone()
    for c in parts[1:]:
        sum_a += c.sum_a
        neg += c.neg
    return Candidates(prune_v, prune_i, grow_v, grow_i, sum_a, neg)


def apply_candidates(packed: Sequence[torch.Tensor], sizes: Sequence[int], k: Sequence[int],
                     cands: Candidates) -> dict[str, torch.Tensor]:
    """In place: each task's k best prune candidates off and its k best regrow candidates on, in the packed masks
    of consecutive pieces of the entries (`packed[j]` int32 [T, ceil(sizes[j]/32)]: the model's layers, or one
    flat tensor); returns the statistics of `harmony_update`. No copy of the masks is made."""
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
            local = index[here] - start
            flat = masks.view(-1)  # [T * W] words
            word = task[here] * masks.shape[1] + local // 32
            words, where = torch.unique(word, return_inverse=True)
            bits = unpack_masks_torch(flat[words][None], words.numel() * 32).view(words.numel(), 32)
            bits[where, local % 32] = on[here]
            flat[words] = pack_masks_torch(bits.reshape(1, -1))[0]
        start += n
    kd = kt.double()
    denominator = float(max(P, 1))
    stats = torch.stack([kd, kd, cands.sum_a.cpu().double() / denominator, cands.neg.cpu().double() / denominator])
    return _stats_dict(stats)
