"""Statistics of a suite report, as Agarwal et al. (2021, "Deep RL at the Edge of the Statistical Precipice",
the rliable library) define them, in numpy alone.

Scores are a [runs, tasks] matrix per arm (runs: the seeds). Aggregates: the interquartile mean (IQM: the mean of
the middle 50% of all runs x tasks scores, scipy.stats.trim_mean with 0.25 cut) and the mean. Intervals: the
percentile stratified bootstrap: each bootstrap sample redraws, for every task separately, as many runs as there
are, with replacement (tasks are the strata, so every sample holds every task), and the interval is the 2.5th and
97.5th percentile of the aggregate over the samples. Two arms are compared with independent stratified bootstraps
of each: the difference of their IQMs and the probability of improvement P(X > Y) (per task the Mann-Whitney
statistic: the share of run pairs where X beats Y, ties half; then the mean over tasks). A difference is called
significant when its 95% interval excludes 0 (IQM difference) or 0.5 (probability of improvement).
(rliable itself installs arch, statsmodels, pandas and seaborn; these few functions need numpy only.)
"""
from __future__ import annotations

import numpy as np

AGGREGATES = ("iqm", "mean")
_BLOCK = 1000  # bootstrap samples per vectorised block: bounds the memory of [block, runs, runs, tasks] tensors


def score_matrix(scores, name: str = "scores") -> np.ndarray:
    """scores as a float [runs, tasks] matrix, checked: two dimensions, at least one run and task, all finite."""
    m = np.asarray(scores, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name}: expected a [runs, tasks] matrix with at least one of each, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name}: non-finite scores at (run, task) {np.argwhere(~np.isfinite(m))[:5].tolist()}")
    return m


def _trimmed(flat: np.ndarray) -> np.ndarray:
    """The IQM over the last axis (scipy.stats.trim_mean(x, 0.25): cut int(0.25 n) scores from each end)."""
    n = flat.shape[-1]
    cut = int(0.25 * n)
    return np.sort(flat, axis=-1)[..., cut : n - cut].mean(-1)


def _aggregate(samples: np.ndarray, aggregate: str) -> np.ndarray:
    """aggregate of [..., runs, tasks] samples -> [...]."""
    flat = samples.reshape(*samples.shape[:-2], -1)
    if aggregate == "iqm":
        return _trimmed(flat)
    if aggregate == "mean":
        return flat.mean(-1)
    raise ValueError(f"unknown aggregate {aggregate!r}; expected one of {AGGREGATES}")


def iqm(scores) -> float:
    """Interquartile mean of all runs x tasks scores."""
    return float(_aggregate(score_matrix(scores), "iqm"))


def stratified_samples(scores: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, runs, tasks]: per sample and task, the task's runs redrawn with replacement."""
    runs, tasks = scores.shape
    idx = rng.integers(0, runs, size=(reps, runs, tasks))
    return np.take_along_axis(np.broadcast_to(scores, (reps, runs, tasks)), idx, axis=1)


def _blocks(reps: int):
    for lo in range(0, reps, _BLOCK):
        yield min(_BLOCK, reps - lo)


def _interval(point: float, samples: np.ndarray, confidence: float) -> dict:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {"point": float(point), "low": float(low), "high": float(high)}


def _check(reps: int, confidence: float) -> None:
    if int(reps) != reps or reps < 1:
        raise ValueError(f"reps must be a positive integer, got {reps}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def interval_estimate(scores, aggregate: str = "iqm", *, reps: int = 10000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """{"point", "low", "high"}: the aggregate of `scores` [runs, tasks] and its stratified bootstrap interval."""
    _check(reps, confidence)
    m = score_matrix(scores)
    rng = np.random.default_rng(seed)
    samples = np.concatenate([_aggregate(stratified_samples(m, n, rng), aggregate) for n in _blocks(reps)])
    return _interval(_aggregate(m, aggregate), samples, confidence)


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) of [..., n, tasks] and [..., m, tasks] samples -> [...]: per task the share of (x, y) run pairs
    with x > y (ties count half), averaged over tasks."""
    diff = x[..., :, None, :] - y[..., None, :, :]  # [..., n, m, tasks]
    wins = (diff > 0).astype(np.float64) + 0.5 * (diff == 0)
    return wins.mean(axis=(-3, -2)).mean(-1)


def probability_of_improvement(x, y) -> float:
    """P(X > Y): the chance that a run of X beats a run of Y on a task drawn uniformly (ties half)."""
    x, y = score_matrix(x, "x"), score_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must score the same tasks: x has {x.shape[1]}, y has {y.shape[1]}")
    return float(_improvement(x, y))


def compare(x, y, *, higher_is_better: bool = True, reps: int = 10000, seed: int = 0,
            confidence: float = 0.95) -> dict:
    """X against Y ([runs, tasks] each, the same tasks in the same order) with independent stratified bootstraps:
    "iqm_difference" (IQM(X) - IQM(Y)) and "probability_of_improvement" (P(X better than Y); for a lower-is-better
    score, P(X < Y)), each {"point", "low", "high", "significant"}."""
    _check(reps, confidence)
    x, y = score_matrix(x, "x"), score_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must score the same tasks: x has {x.shape[1]}, y has {y.shape[1]}")
    sign = 1.0 if higher_is_better else -1.0
    rng = np.random.default_rng(seed)
    diffs, probs = [], []
    for n in _blocks(reps):
        xs, ys = stratified_samples(x, n, rng), stratified_samples(y, n, rng)
        diffs.append(_aggregate(xs, "iqm") - _aggregate(ys, "iqm"))
        probs.append(_improvement(sign * xs, sign * ys))
    out = {"iqm_difference": _interval(_aggregate(x, "iqm") - _aggregate(y, "iqm"), np.concatenate(diffs), confidence),
           "probability_of_improvement": _interval(_improvement(sign * x, sign * y), np.concatenate(probs),
                                                   confidence)}
    for key, null in (("iqm_difference", 0.0), ("probability_of_improvement", 0.5)):
        out[key]["significant"] = not out[key]["low"] <= null <= out[key]["high"]
    return out


def performance_profile(scores, taus, *, reps: int = 10000, seed: int = 0, confidence: float = 0.95) -> dict:
    """The share of runs x tasks scores >= tau for every tau, with its stratified bootstrap interval:
    {"taus", "fraction", "low", "high"} (lists)."""
    _check(reps, confidence)
    m = score_matrix(scores)
    taus = np.asarray(taus, dtype=np.float64).reshape(-1)
    rng = np.random.default_rng(seed)

    def share(samples):  # [..., runs, tasks] -> [..., len(taus)]
        flat = samples.reshape(*samples.shape[:-2], -1)
        return (flat[..., None, :] >= taus[:, None]).mean(-1)

    samples = np.concatenate([share(stratified_samples(m, n, rng)) for n in _blocks(reps)])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return {"taus": taus.tolist(), "fraction": share(m).tolist(), "low": low.tolist(), "high": high.tolist()}
