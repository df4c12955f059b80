"""The harmony mask update (docs/method.md, "Outer level"): the plain-PyTorch reference, the C++ op, the torch-ops device
path, a streaming form, and the task-gradient cosine similarity.

For every task t, with g_t its gradient (of the effective weight, so inactive entries have real values) and
ḡ = (1/T) Σ_t g_t:
    a_t     = ḡ ⊙ g_t                               agreement with the harmony gradient
    prune   = the k_t ACTIVE entries with the lowest  γ·a_t + s_t
              s_t = g_t² ("fisher"), |θ| ("magnitude"), 0 ("harmony")
    regrow  = the k_t INACTIVE entries (before this update) with the highest a_t
Ties go to the lower index. k_t = min(k, active count, inactive count) (documented clamp), so density is kept.

Exact arithmetic, which every backend reproduces bit for bit: values are converted to float64; ḡ is the sum over
tasks in order t = 0..T-1, then divided by T; a_t = ḡ·g_t; the prune score is (γ·a_t) + s_t, with no fused
multiply-add. -0.0 and +0.0 are equal keys (ties, so the lower index wins).

Implementations ("which ran" is `last_implementation()`; `hf.ops.last_backend` gives the backend):
- "cpp" (CPU tensors): csrc/harmony.cpp, one pass over the gradients with bounded per-task heaps, no [T, P]
  temporaries, NaN/inf detected inside the same pass.
- "torch" on CPU tensors: `harmony_update_torch`, the reference that defines the semantics.
- "torch" on other devices (CUDA): `harmony_update_device`, torch ops on the device in chunks of entries with an
  exact partial selection (top-k threshold, ties resolved by index); the same masks as the reference. There is no
  hand-written CUDA kernel.
`HarmonyStream` takes the gradients in consecutive chunks of entries (layer by layer) and finishes with exactly the
masks of the whole-vector call, keeping only each task's best k candidates ("cpp" on CPU, the torch-ops form
elsewhere).
"""
from __future__ import annotations

from typing import Sequence

import torch

from harmodt_fast.ops._dispatch import register, select
from harmodt_fast.ops.packing import pack_masks_torch, popcount_rows, unpack_masks_torch, words_for

SCORES = ("fisher", "magnitude", "harmony")
STAT_NAMES = ("pruned", "regrown", "mean_agreement", "conflict_fraction")


def score_needs_weight(score: str) -> bool:
    """Whether the prune score reads the weights |θ|."""
    return score == "magnitude"

_last_impl: dict[str, str] = {}


def last_implementation(op: str = "harmony_update") -> str | None:
    """Which code ran the last call of `op`: "cpp", "torch-reference" or "torch-device" (None before any)."""
    return _last_impl.get(op)


def _check_masks_k(where: str, T: int, P: int, masks_packed, k, gamma, score) -> tuple[list[int], float]:
    """Checks masks, k, gamma and score for T tasks over P entries; returns (requested flips per task, gamma)."""
    if T < 1:
        raise ValueError(f"{where}: needs at least one task, got T={T}")
    if (
        not isinstance(masks_packed, torch.Tensor)
        or masks_packed.dtype != torch.int32
        or tuple(masks_packed.shape) != (T, words_for(P))
    ):
        raise ValueError(
            f"{where}: masks_packed must be int32 [{T}, {words_for(P)}] for {T} tasks x {P} entries, "
            f"got {getattr(masks_packed, 'shape', None)} {getattr(masks_packed, 'dtype', None)}"
        )
    if score not in SCORES:
        raise ValueError(f"{where}: unknown score {score!r}; expected one of {SCORES}")
    gamma = float(gamma)
    if gamma != gamma or gamma in (float("inf"), float("-inf")):
        raise ValueError(f"{where}: gamma must be finite, got {gamma}")
    ks = [int(k)] * T if isinstance(k, (int,)) or (isinstance(k, torch.Tensor) and k.dim() == 0) else [int(v) for v in k]
    if len(ks) != T or any(v < 0 for v in ks):
        raise ValueError(f"{where}: k must be a non-negative int or {T} of them, got {k}")
    return ks, gamma


def _nonfinite_tasks(grads: torch.Tensor) -> list[int]:
    # one row at a time: no [T, P] boolean temporaries
    return [t for t in range(grads.shape[0]) if not bool(torch.isfinite(grads[t]).all())]


def _check_finite(weight_flat, grads, score, where="harmony_update") -> None:
    bad = _nonfinite_tasks(grads)
    if bad:
        raise ValueError(f"{where}: grads contain NaN or inf for task(s) {bad[:10]}")
    if score == "magnitude" and not bool(torch.isfinite(weight_flat).all()):
        raise ValueError(f"{where}: weight_flat contains NaN or inf")


def check_harmony_args(weight_flat, grads, masks_packed, k, gamma, score, check_finite: bool = True) -> list[int]:
    """Validates the arguments of harmony_update; returns the requested flips per task. `check_finite=False` skips
    the NaN/inf scan (the cpp op and the device path detect those in their own pass)."""
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or not grads.dtype.is_floating_point:
        raise ValueError(f"harmony_update: grads must be a floating tensor [T, P], got {getattr(grads, 'shape', grads)}")
    T, P = grads.shape
    if not isinstance(weight_flat, torch.Tensor) or weight_flat.shape != (P,) or not weight_flat.dtype.is_floating_point:
        raise ValueError(
            f"harmony_update: weight_flat must be a floating tensor [{P}] to match grads {tuple(grads.shape)}, "
            f"got {getattr(weight_flat, 'shape', weight_flat)}"
        )
    if not isinstance(masks_packed, torch.Tensor) or masks_packed.dtype != torch.int32 or masks_packed.shape != (T, words_for(P)):
        raise ValueError(
            f"harmony_update: masks_packed must be int32 [{T}, {words_for(P)}] for grads {tuple(grads.shape)}, "
            f"got {getattr(masks_packed, 'shape', None)} {getattr(masks_packed, 'dtype', None)}"
        )
    if len({grads.device, weight_flat.device, masks_packed.device}) != 1:
        raise ValueError("harmony_update: weight_flat, grads and masks_packed must be on one device")
    ks, _ = _check_masks_k("harmony_update", T, P, masks_packed, k, gamma, score)
    if check_finite:
        _check_finite(weight_flat, grads, score)
    return ks


def _stats_dict(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    stats = stats.to("cpu", torch.float64)
    return {name: stats[i].clone() for i, name in enumerate(STAT_NAMES)}


# --- the reference ----------------------------------------------------------------------------------------------
def harmony_update_torch(weight_flat, grads, masks_packed, ks: list[int], gamma: float, score: str):
    T, P = grads.shape
    gbar = grads[0].double().clone()
    for t in range(1, T):
        gbar += grads[t].double()
    # a tensor divisor: CUDA turns division by a Python scalar into multiplication by its reciprocal, which rounds
    # differently (same result as `/= T` on the CPU)
    gbar /= torch.tensor(float(T), dtype=torch.float64, device=gbar.device)
    masks = unpack_masks_torch(masks_packed, P)
    new_masks = masks.clone()
    stats = {name: torch.zeros(T, dtype=torch.float64) for name in STAT_NAMES}
    magnitude = weight_flat.double().abs() if score == "magnitude" else None
    for t in range(T):
        g = grads[t].double()
        agreement = gbar * g
        if score == "fisher":
            prune_score = gamma * agreement + g * g
        elif score == "magnitude":
            prune_score = gamma * agreement + magnitude
        else:
            prune_score = gamma * agreement + 0.0
        active_idx = masks[t].nonzero().flatten()
        inactive_idx = (~masks[t]).nonzero().flatten()
        k_t = min(ks[t], active_idx.numel(), inactive_idx.numel())
        if k_t > 0:
            prune = active_idx[torch.sort(prune_score[active_idx], stable=True).indices[:k_t]]
            grow = inactive_idx[torch.sort(agreement[inactive_idx], descending=True, stable=True).indices[:k_t]]
            new_masks[t, prune] = False
            new_masks[t, grow] = True
        stats["pruned"][t] = stats["regrown"][t] = k_t
        stats["mean_agreement"][t] = agreement.mean().item() if P else 0.0
        stats["conflict_fraction"][t] = (agreement < 0).double().mean().item() if P else 0.0
    return pack_masks_torch(new_masks), stats


# --- torch ops on the device, streaming ---------------------------------------------------------------------------
def _active_counts(masks_packed: torch.Tensor, P: int) -> list[int]:
    if P % 32:
        last = masks_packed[:, -1:] & ((1 << (P % 32)) - 1)  # bits past P are not entries
        masks_packed = torch.cat([masks_packed[:, :-1], last], dim=1)
    return [int(c) for c in popcount_rows(masks_packed).tolist()]


def prune_scores(score: str, gamma: float, a: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
                 offset: int) -> torch.Tensor:
    """γ·a_t + s_t in float64 as the reference rounds it (no fused multiply-add), for g (float64) over entries
    offset.. with agreement a; `weight` is read for the "magnitude" score only."""
    if score == "fisher":
        return gamma * a + g * g
    if score == "magnitude":
        magnitude = weight.double().abs()
        if not bool(torch.isfinite(magnitude).all()):
            raise ValueError(f"harmony_update: weight_flat contains NaN or inf (entries {offset}.."
                             f"{offset + magnitude.numel()})")
        return gamma * a + magnitude
    return gamma * a + 0.0


class TorchHarmonyStream:
    """The harmony update from torch ops on the masks' device, fed consecutive chunks of entries.

    Per chunk (split further into pieces of about `elements` T x p values, which bounds the temporaries): ḡ, a_t
    and the prune scores exactly as the reference computes them, then per task the chunk's best K = max_t k_t
    candidates by (key, index) (a top-k gives the K-th key; the entries below it plus the lowest-index ones equal to
    it are exactly the stable sort's first K), merged with the best K so far. Candidates are O(T x K).
    """

    def __init__(self, num_tasks, total, masks_packed, ks, gamma, score, elements: int | None = None):
        self.T, self.P = int(num_tasks), int(total)
        self.masks = masks_packed
        self.device = masks_packed.device
        self.gamma, self.score = float(gamma), score
        counts = _active_counts(masks_packed, self.P)
        self.k = [min(k, c, self.P - c) for k, c in zip(ks, counts)]
        self.K = max(self.k, default=0)
        if elements is None:
            elements = 1 << (25 if self.device.type == "cuda" else 21)
        self.piece = max(1, int(elements) // self.T)
        f64 = dict(dtype=torch.float64, device=self.device)
        self._T = torch.tensor(float(self.T), **f64)
        self._nan = torch.tensor(float("nan"), **f64)
        empty_v, empty_i = torch.empty(self.T, 0, **f64), torch.empty(self.T, 0, dtype=torch.int64, device=self.device)
        self._prune = (empty_v, empty_i)
        self._grow = (empty_v, empty_i)
        self._sum = torch.zeros(self.T, **f64)
        self._neg = torch.zeros(self.T, dtype=torch.int64, device=self.device)
        self.offset = 0
        self._failed = self._finished = False

    def feed(self, weight_chunk: torch.Tensor, grads_chunk: torch.Tensor) -> None:
        if self._finished or self._failed:
            raise RuntimeError("HarmonyStream: feed() after finish() or after a failed feed(); start a new stream")
        n = grads_chunk.shape[1]
        try:
            for s in range(0, n, self.piece):
                e = min(n, s + self.piece)
                self._feed(weight_chunk[s:e], grads_chunk[:, s:e], self.offset + s)
        except Exception:
            self._failed = True
            raise
        self.offset += n

    def _bits(self, off: int, n: int) -> torch.Tensor:
        w0, w1 = off // 32, (off + n - 1) // 32 + 1
        bits = unpack_masks_torch(self.masks[:, w0:w1], (w1 - w0) * 32)
        return bits[:, off - 32 * w0 : off - 32 * w0 + n]

    def _feed(self, w: torch.Tensor, g: torch.Tensor, off: int) -> None:
        T, n = self.T, g.shape[1]
        gd = g.to(torch.float64)
        gbar = gd[0].clone()
        for t in range(1, T):
            gbar += gd[t]
        gbar /= self._T
        # the float64 sum is finite exactly when every task's entry is
        if not bool(torch.isfinite(gbar).all()):
            bad = _nonfinite_tasks(g)
            if not bad:
                raise ValueError(f"harmony_update: the sum of the task gradients overflows (entries {off}..{off + n})")
            raise ValueError(f"harmony_update: grads contain NaN or inf for task(s) {bad[:10]} (entries {off}..{off + n})")
        a = gbar * gd
        self._sum += a.sum(dim=1)
        self._neg += (a < 0).sum(dim=1)
        if self.K == 0:
            return
        sc = prune_scores(self.score, self.gamma, a, gd, w, off)
        act = self._bits(off, n)
        idx = torch.arange(off, off + n, device=self.device)
        # keys ascending, NaN = not a candidate; "+ 0.0" turns -0.0 into +0.0 so that bitwise (radix) orderings on
        # the device agree with numeric equality
        self._prune = self._merge(*self._prune, torch.where(act, sc + 0.0, self._nan), idx)
        self._grow = self._merge(*self._grow, torch.where(act, self._nan, -a + 0.0), idx)

    def _merge(self, cand_v, cand_i, key, idx):
        T, n = key.shape
        kc = min(self.K, n)
        kth = torch.topk(key, kc, dim=1, largest=False, sorted=True).values[:, -1:]  # NaN sorts last
        below = key < kth
        equal = key == kth
        need = kc - below.sum(dim=1, keepdim=True)
        take = below | (equal & (equal.cumsum(dim=1) <= need))
        take = torch.where(torch.isnan(kth), ~torch.isnan(key), take)  # fewer than kc candidates: all of them
        pos = take.cumsum(dim=1) - 1
        rows, cols = take.nonzero(as_tuple=True)
        new_v = torch.full((T, kc), float("nan"), dtype=torch.float64, device=self.device)
        new_i = torch.full((T, kc), -1, dtype=torch.int64, device=self.device)
        slot = pos[rows, cols]
        new_v[rows, slot] = key[rows, cols]
        new_i[rows, slot] = idx[cols]
        # earlier candidates have lower indices and come first: a stable sort by key keeps index order on ties
        all_v, all_i = torch.cat([cand_v, new_v], dim=1), torch.cat([cand_i, new_i], dim=1)
        order = torch.sort(all_v, dim=1, stable=True).indices[:, : self.K]
        return all_v.gather(1, order), all_i.gather(1, order)

    def finish(self):
        if self._finished or self._failed:
            raise RuntimeError("HarmonyStream: finish() twice or after a failed feed(); start a new stream")
        if self.offset != self.P:
            raise ValueError(f"HarmonyStream: finish() after {self.offset} of {self.P} entries were fed")
        self._finished = True
        new = self.masks.clone()
        if self.P % 32:
            new[:, -1] &= (1 << (self.P % 32)) - 1  # the output's bits past P are 0, like pack_masks
        for t in range(self.T):
            k = self.k[t]
            if k == 0:
                continue
            prune, grow = self._prune[1][t, :k], self._grow[1][t, :k]
            flips = torch.cat([prune, grow])
            value = torch.cat([torch.zeros(k, dtype=torch.bool, device=self.device),
                               torch.ones(k, dtype=torch.bool, device=self.device)])
            words, where = torch.unique(flips // 32, return_inverse=True)
            bits = unpack_masks_torch(new[t : t + 1, words], words.numel() * 32).view(words.numel(), 32)
            bits[where, flips % 32] = value
            new[t, words] = pack_masks_torch(bits.reshape(1, -1))[0]
        P = max(self.P, 1)
        stats = torch.stack([
            torch.tensor(self.k, dtype=torch.float64), torch.tensor(self.k, dtype=torch.float64),
            (self._sum / P).cpu(), (self._neg.double() / P).cpu(),
        ])
        return new, _stats_dict(stats)


def harmony_update_device(weight_flat, grads, masks_packed, ks: list[int], gamma: float, score: str):
    """The whole-vector call through TorchHarmonyStream (torch ops on the tensors' device)."""
    T, P = grads.shape
    stream = TorchHarmonyStream(T, P, masks_packed, ks, gamma, score)
    stream.feed(weight_flat, grads)
    return stream.finish()


def _harmony_update_torch_backend(weight_flat, grads, masks_packed, ks, gamma, score):
    if grads.device.type == "cpu":
        _last_impl["harmony_update"] = "torch-reference"
        _check_finite(weight_flat, grads, score)
        return harmony_update_torch(weight_flat, grads, masks_packed, ks, gamma, score)
    _last_impl["harmony_update"] = "torch-device"
    return harmony_update_device(weight_flat, grads, masks_packed, ks, gamma, score)


# --- the C++ op -----------------------------------------------------------------------------------------------------
class CppHarmonyStream:
    """harmodt_fast._C.HarmonyState behind the stream interface (CPU tensors)."""

    def __init__(self, num_tasks, total, masks_packed, ks, gamma, score):
        from harmodt_fast._ext import load_extension

        self._state = load_extension().HarmonyState(int(total), masks_packed, list(ks), float(gamma), SCORES.index(score))
        self.k = list(self._state.k)

    @property
    def offset(self) -> int:
        return self._state.offset

    def feed(self, weight_chunk, grads_chunk) -> None:
        self._state.feed(weight_chunk, grads_chunk)

    def finish(self):
        new, stats = self._state.finish()
        return new, _stats_dict(stats)


def harmony_update_cpp(weight_flat, grads, masks_packed, ks: list[int], gamma: float, score: str):
    _last_impl["harmony_update"] = "cpp"
    T, P = grads.shape
    stream = CppHarmonyStream(T, P, masks_packed, ks, gamma, score)
    stream.feed(weight_flat, grads)
    return stream.finish()


register("harmony_update", "torch", "harmodt_fast.ops.harmony:_harmony_update_torch_backend")
register("harmony_update", "cpp", "harmodt_fast.ops.harmony:harmony_update_cpp")
register("harmony_stream", "torch", "harmodt_fast.ops.harmony:TorchHarmonyStream")
register("harmony_stream", "cpp", "harmodt_fast.ops.harmony:CppHarmonyStream")


def harmony_update(
    weight_flat: torch.Tensor,
    grads: torch.Tensor,
    masks_packed: torch.Tensor,
    k: int | Sequence[int],
    gamma: float = 10.0,
    score: str = "fisher",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One harmony mask update for all tasks; returns (new packed masks [T, W], stats).

    weight_flat [P]: the masked weights, flattened and concatenated; grads [T, P] (fp32 or bf16): each task's
    gradient of its effective weight; masks_packed int32 [T, ceil(P/32)]; k: flips each way, an int or one per
    task (clamped to the task's active and inactive counts). stats: float64 CPU tensors [T] "pruned", "regrown"
    (flips made), "mean_agreement" (mean of a_t over all P entries) and "conflict_fraction" (share with a_t < 0).
    NaN or inf in grads (or in weight_flat for score "magnitude") raise ValueError.
    """
    ks = check_harmony_args(weight_flat, grads, masks_packed, k, gamma, score, check_finite=False)
    _, fn = select("harmony_update", backend, grads.device)
    return fn(weight_flat, grads, masks_packed, ks, float(gamma), score)


class HarmonyStream:
    """The harmony update fed layer by layer, for models whose [T, P] gradients do not fit at once.

        stream = HarmonyStream(num_tasks, total_P, masks_packed, k, gamma, score)
        for weight_chunk, grads_chunk in ...:        # consecutive entries, in order over P
            stream.feed(weight_chunk, grads_chunk)   # [p], [T, p]; rows of grads_chunk may be strided
        new_packed, stats = stream.finish()

    The result is exactly that of `harmony_update` on the concatenated inputs. Extra memory: each task's best k
    prune and regrow candidates (O(T x k); the cpp form keeps one such set per thread during a feed) plus
    temporaries bounded by the chunk. masks_packed is read during the feeds: do not modify it before finish().
    Bad chunks raise ValueError; a stream whose feed failed, or that finished, raises RuntimeError when used again.
    """

    def __init__(self, num_tasks: int, total_P: int, masks_packed: torch.Tensor, k: int | Sequence[int],
                 gamma: float = 10.0, score: str = "fisher", backend: str = "auto"):
        self.num_tasks, self.total = int(num_tasks), int(total_P)
        if self.total < 0:
            raise ValueError(f"HarmonyStream: total_P must be >= 0, got {total_P}")
        ks, gamma = _check_masks_k("HarmonyStream", self.num_tasks, self.total, masks_packed, k, gamma, score)
        self.backend, impl = select("harmony_stream", backend, masks_packed.device)
        self.device = masks_packed.device
        self._impl = impl(self.num_tasks, self.total, masks_packed, ks, gamma, score)

    @property
    def k(self) -> list[int]:
        """The flips each task will make (k clamped to its active and inactive counts)."""
        return list(self._impl.k)

    @property
    def offset(self) -> int:
        """Entries fed so far."""
        return self._impl.offset

    def feed(self, weight_chunk: torch.Tensor, grads_chunk: torch.Tensor) -> None:
        T = self.num_tasks
        if not isinstance(grads_chunk, torch.Tensor) or grads_chunk.dim() != 2 or grads_chunk.shape[0] != T \
                or not grads_chunk.dtype.is_floating_point:
            raise ValueError(f"HarmonyStream.feed: grads_chunk must be a floating tensor [{T}, p], "
                             f"got {getattr(grads_chunk, 'shape', grads_chunk)}")
        p = grads_chunk.shape[1]
        if not isinstance(weight_chunk, torch.Tensor) or weight_chunk.shape != (p,) \
                or not weight_chunk.dtype.is_floating_point:
            raise ValueError(f"HarmonyStream.feed: weight_chunk must be a floating tensor [{p}] to match grads_chunk "
                             f"{tuple(grads_chunk.shape)}, got {getattr(weight_chunk, 'shape', weight_chunk)}")
        if grads_chunk.device != self.device or weight_chunk.device != self.device:
            raise ValueError(f"HarmonyStream.feed: chunks must be on {self.device} (the masks' device), got "
                             f"{weight_chunk.device} and {grads_chunk.device}")
        if self.offset + p > self.total:
            raise ValueError(f"HarmonyStream.feed: entries {self.offset}..{self.offset + p} run past "
                             f"total_P={self.total}")
        self._impl.feed(weight_chunk, grads_chunk)

    def finish(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(new packed masks [T, W], stats) as from `harmony_update`."""
        return self._impl.finish()


# --- task agreement -------------------------------------------------------------------------------------------
def _cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    gram = (gram + gram.t()) * 0.5  # BLAS leaves the two triangles a rounding apart; the result is symmetric
    diag = gram.diagonal()
    finite = torch.isfinite(diag)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"task_agreement: grads contain NaN or inf (or overflow float64) for task(s) {bad[:10]}")
    # a task with a zero gradient has no direction: 0 with every task, itself included
    norms = diag.sqrt()
    denom = torch.outer(norms, norms)
    cos = torch.where(denom > 0, gram / denom, torch.zeros_like(gram)).clamp_(-1.0, 1.0)
    cos.diagonal().copy_((norms > 0).double())
    return cos


def task_agreement_torch(grads: torch.Tensor) -> torch.Tensor:
    T, P = grads.shape
    gram = torch.zeros(T, T, dtype=torch.float64, device=grads.device)
    chunk = max(1, min(P, (1 << 21) // T))  # float64 pieces of ~16 MB, not a [T, P] float64 copy
    for c0 in range(0, P, chunk):
        piece = grads[:, c0 : c0 + chunk].double()
        gram.addmm_(piece, piece.t())
    return _cosine_from_gram(gram)


def task_agreement_cpp(grads: torch.Tensor) -> torch.Tensor:
    from harmodt_fast._ext import load_extension

    return load_extension().task_agreement(grads)


register("task_agreement", "torch", "harmodt_fast.ops.harmony:task_agreement_torch")
register("task_agreement", "cpp", "harmodt_fast.ops.harmony:task_agreement_cpp")


def task_agreement(grads: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Cosine similarity of the per-task gradients [T, P] -> float64 [T, T] on grads' device (diagnostics, plots).

    Computed in float64 over chunks of P; a task whose gradient is zero gets 0 everywhere (its diagonal included).
    NaN or inf raise ValueError."""
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or not grads.dtype.is_floating_point or grads.shape[0] < 1:
        raise ValueError(f"task_agreement: grads must be a floating tensor [T, P] with T >= 1, "
                         f"got {getattr(grads, 'shape', grads)}")
    _, fn = select("task_agreement", backend, grads.device)
    return fn(grads)
