"""The harmony mask update (docs/method.md, "Outer level"): its specification (the plain-PyTorch reference), the
score table, the argument checks, the op `harmony_update` and the task-gradient cosine similarity. Its
implementations, one row engine per backend, are in harmony_rows.py.

For every task t, with g_t its gradient (of the effective weight, so inactive entries have real values) and
ḡ = (1/T) Σ_t g_t:
    a_t     = ḡ ⊙ g_t                               agreement with the harmony gradient
    prune   = the k_t ACTIVE entries with the lowest  γ·a_t + s_t   (s_t: the score, from SCORE_TABLE)
    regrow  = the k_t INACTIVE entries (before this update) with the highest a_t
Ties go to the lower index. k_t = min(k, active count, inactive count) (documented clamp), so density is kept.

Exact arithmetic, which every backend reproduces bit for bit: values are converted to float64; ḡ is the sum over
tasks in order t = 0..T-1, then divided by T; a_t = ḡ·g_t; the prune score is (γ·a_t) + s_t, with no fused
multiply-add. -0.0 and +0.0 are equal keys (ties, so the lower index wins).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from harmodt_fast import _ext
from harmodt_fast.ops._dispatch import BackendUnavailableError, register, select
from harmodt_fast.ops.packing import pack_masks_torch, popcount_rows, unpack_masks_torch, words_for

STAT_NAMES = ("pruned", "regrown", "mean_agreement", "conflict_fraction")
# the published prune trade-off and score: the defaults of the ops and of HarmoDTConfig (config.py reads them here)
DEFAULT_GAMMA, DEFAULT_SCORE = 10.0, "fisher"


# --- the scores -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """One prune score s_t. `key(g, w)`: s_t from the task's gradient g (float64 [..., n]) and the weights w
    (float64 [n], None unless `needs_weight`), a tensor or a number that broadcasts against g; `cpp_id`: its id in
    the C++ op (csrc/harmony.cpp: score_ids()), None where the C++ op does not implement it (the torch backend
    runs it)."""

    name: str
    needs_weight: bool
    key: Callable
    cpp_id: int | None


# The one list of scores: the config's choices, the reference, the torch row engine and the C++ ids come from here.
SCORE_TABLE: dict[str, Score] = {s.name: s for s in (
    Score("fisher", needs_weight=False, key=lambda g, w: g * g, cpp_id=0),
    Score("magnitude", needs_weight=True, key=lambda g, w: w.abs(), cpp_id=1),
    Score("harmony", needs_weight=False, key=lambda g, w: 0.0, cpp_id=2),  # "+ 0.0": -0.0 becomes +0.0
)}


def score_names() -> tuple[str, ...]:
    return tuple(SCORE_TABLE)


def score_needs_weight(name: str) -> bool:
    """Whether the score reads the weights |θ| (the caller may pass a dummy weight otherwise)."""
    return SCORE_TABLE[name].needs_weight


def cpp_score_reason(name: str) -> str | None:
    """Why the cpp backend cannot run score `name` (None when it can)."""
    if SCORE_TABLE[name].cpp_id is None:
        return f"the cpp op does not implement score {name!r} (no C++ id in the score table)"
    return None


def _check_cpp_score_ids(module) -> str | None:
    """The C++ op's score ids against the table (run once, as the extension loads): None when they agree."""
    have = dict(module.score_ids()) if hasattr(module, "score_ids") else None
    want = {s.name: s.cpp_id for s in SCORE_TABLE.values() if s.cpp_id is not None}
    if have != want:
        return (f"the C++ extension's score ids {have} do not match the score table's {want} in "
                "harmodt_fast/ops/harmony.py (a stale build? rebuild it)")
    return None


_ext.add_load_check(_check_cpp_score_ids)


# --- argument checks ------------------------------------------------------------------------------------------------
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
    if score not in SCORE_TABLE:
        raise ValueError(f"{where}: unknown score {score!r}; expected one of {score_names()}")
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
    if score_needs_weight(score) and not bool(torch.isfinite(weight_flat).all()):
        raise ValueError(f"{where}: weight_flat contains NaN or inf")


def check_harmony_args(weight_flat, grads, masks_packed, k, gamma, score, check_finite: bool = True) -> list[int]:
    """Validates the arguments of harmony_update; returns the requested flips per task. `check_finite=False` skips
    the NaN/inf scan (the row engines detect those in their own pass)."""
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


def _active_counts(masks_packed: torch.Tensor, P: int) -> list[int]:
    if P % 32:
        last = masks_packed[:, -1:] & ((1 << (P % 32)) - 1)  # bits past P are not entries
        masks_packed = torch.cat([masks_packed[:, :-1], last], dim=1)
    return [int(c) for c in popcount_rows(masks_packed).tolist()]


# --- the reference (the specification) ---------------------------------------------------------------------------
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
    entry = SCORE_TABLE[score]
    weight = weight_flat.double() if entry.needs_weight else None
    for t in range(T):
        g = grads[t].double()
        agreement = gbar * g
        prune_score = gamma * agreement + entry.key(g, weight)
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


# --- the op ---------------------------------------------------------------------------------------------------------
# the backends run the row engines of harmony_rows.py (registered by name: that module imports this one)
register("harmony_update", "torch", "harmodt_fast.ops.harmony_rows:_harmony_update_torch")
register("harmony_update", "cpp", "harmodt_fast.ops.harmony_rows:_harmony_update_cpp")

_last_impl: dict[str, str] = {}
_fallback: dict[str, str] = {}


def last_implementation(op: str = "harmony_update") -> str | None:
    """Which code ran the last call of `op`: "cpp", "torch-reference" (the specification, CPU tensors) or
    "torch-device" (the torch row engine; other devices). None before any."""
    return _last_impl.get(op)


def fallback_reason(op: str = "harmony_update") -> str | None:
    """Why the last "auto" call of `op` ("harmony_update", "harmony_rows") did not run cpp because of its score
    (None when the score did not stand in the way)."""
    return _fallback.get(op)


def select_for_score(op: str, backend: str, device: torch.device, score: str):
    """`select` for a harmony op: a score without a C++ id cannot run on cpp, so "auto" takes torch (and
    `fallback_reason(op)` says why) and "cpp" raises a RuntimeError with the reason."""
    _fallback.pop(op, None)
    reason = cpp_score_reason(score)
    if reason is not None and backend == "cpp":
        raise BackendUnavailableError(f"{op}: the cpp backend cannot run here: {reason}")
    if reason is not None and backend == "auto":
        _fallback[op] = f"auto took torch: {reason}"
        backend = "torch"
    return select(op, backend, device)


def harmony_update(
    weight_flat: torch.Tensor,
    grads: torch.Tensor,
    masks_packed: torch.Tensor,
    k: int | Sequence[int],
    gamma: float = DEFAULT_GAMMA,
    score: str = DEFAULT_SCORE,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One harmony mask update for all tasks; returns (new packed masks [T, W], stats).

    weight_flat [P]: the masked weights, flattened and concatenated; grads [T, P] (fp32 or bf16; rows may be
    strided): each task's gradient of its effective weight; masks_packed int32 [T, ceil(P/32)]; k: flips each way,
    an int or one per task (clamped to the task's active and inactive counts); score: a name of SCORE_TABLE (one
    without a C++ id runs on torch). stats: float64 CPU tensors [T] "pruned", "regrown" (flips made),
    "mean_agreement" (mean of a_t over all P entries) and "conflict_fraction" (share with a_t < 0). NaN or inf in
    grads (or in weight_flat for a score that reads it) raise ValueError.
    """
    ks = check_harmony_args(weight_flat, grads, masks_packed, k, gamma, score, check_finite=False)
    chosen, fn = select_for_score("harmony_update", backend, grads.device, score)
    _last_impl["harmony_update"] = (chosen if chosen == "cpp" else
                                    "torch-reference" if grads.device.type == "cpu" else "torch-device")
    return fn(weight_flat, grads, masks_packed, ks, float(gamma), score)


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
