"""report_stats: IQM against scipy, the stratified bootstrap against scipy's bootstrap and known answers, interval
coverage on synthetic data, the probability of improvement on hand-computed cases."""
import numpy as np
import pytest
from scipy import stats

from harmodt_fast.report_stats import (
    compare, interval_estimate, iqm, performance_profile, probability_of_improvement, stratified_samples,
)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 7), (10, 50), (2, 3)])
def test_iqm_is_scipys_trimmed_mean(shape):
    x = np.random.default_rng(shape[0] * 100 + shape[1]).normal(size=shape)
    assert iqm(x) == pytest.approx(stats.trim_mean(x, 0.25, axis=None), rel=1e-12)


def test_iqm_known_answer():
    # 8 scores: the lowest 2 and highest 2 are cut, the middle 4 averaged
    assert iqm([[0, 100, 1, 2], [3, 4, -50, 7]]) == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_samples_are_stratified_by_task():
    scores = np.array([[0.0, 1.0, 5.0], [0.5, 2.0, 6.0]])
    samples = stratified_samples(scores, 500, np.random.default_rng(0))
    assert samples.shape == (500, 2, 3)
    for t in range(3):  # every sample's column t holds only task t's runs, and both runs get drawn
        assert set(np.unique(samples[:, :, t])) == set(scores[:, t])
    # task means differ but each task's runs agree: a stratified bootstrap of the mean has no spread at all
    constant_per_task = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    est = interval_estimate(constant_per_task, "mean", reps=2000)
    assert est == {"point": 0.5, "low": 0.5, "high": 0.5}


def test_one_task_matches_scipys_percentile_bootstrap():
    # with one stratum the stratified bootstrap is the ordinary one: same interval up to Monte Carlo error
    x = np.random.default_rng(1).exponential(size=40)
    ours = interval_estimate(x[:, None], "mean", reps=20000, seed=3)
    ref = stats.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(4)).confidence_interval
    assert ours["point"] == pytest.approx(x.mean())
    width = ref.high - ref.low
    assert ours["low"] == pytest.approx(ref.low, abs=0.03 * width)
    assert ours["high"] == pytest.approx(ref.high, abs=0.03 * width)


def test_intervals_cover_the_true_iqm_about_95_percent_of_the_time():
    # 5 tasks with different means, 20 runs each, normal noise: the population IQM of a task's N(mu, 1) scores
    # pooled over tasks is computed from a huge sample; the 95% intervals of 300 small suites should cover it
    rng = np.random.default_rng(7)
    mus = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    truth = stats.trim_mean((mus + rng.normal(size=(400000, 5))).ravel(), 0.25)
    hits = 0
    for trial in range(300):
        est = interval_estimate(mus + rng.normal(size=(20, 5)), "iqm", reps=500, seed=trial)
        hits += est["low"] <= truth <= est["high"]
    assert 0.88 <= hits / 300 <= 0.99


def test_probability_of_improvement_known_answers():
    x = [[1.0, 5.0], [2.0, 6.0]]
    assert probability_of_improvement(x, x) == 0.5  # only ties and mirrored pairs
    assert probability_of_improvement([[3.0, 7.0]], [[1.0, 5.0], [2.0, 6.0]]) == 1.0
    # task 0: x=[1, 3] vs y=[2]: pairs (1<2), (3>2) -> 0.5; task 1: x=[5, 5] vs y=[5]: ties -> 0.5; task 2: 0
    assert probability_of_improvement([[1, 5, 0], [3, 5, 0]], [[2, 5, 1]]) == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_compare_calls_a_clear_gap_significant_and_noise_not():
    rng = np.random.default_rng(0)
    better, worse = 0.8 + 0.05 * rng.normal(size=(5, 6)), 0.2 + 0.05 * rng.normal(size=(5, 6))
    gap = compare(better, worse, reps=2000)
    assert gap["iqm_difference"]["significant"] and gap["iqm_difference"]["low"] > 0.4
    assert gap["probability_of_improvement"] == {"point": 1.0, "low": 1.0, "high": 1.0, "significant": True}
    same = compare(rng.normal(size=(5, 6)), rng.normal(size=(5, 6)), reps=2000)
    assert not same["iqm_difference"]["significant"] and not same["probability_of_improvement"]["significant"]
    # lower is better (an error): the smaller scores improve
    assert compare(worse, better, higher_is_better=False, reps=500)["probability_of_improvement"]["point"] == 1.0


def test_performance_profile():
    scores = np.array([[0.0, 0.5, 1.0, 1.0]])
    prof = performance_profile(scores, [0.0, 0.5, 0.75, 1.0], reps=200)
    assert prof["fraction"] == [1.0, 0.75, 0.5, 0.5]
    assert prof["low"] == prof["high"] == prof["fraction"]  # one run per task: every sample is the data
    two = performance_profile([[0.0, 1.0], [1.0, 1.0]], [0.5], reps=4000)
    assert two["fraction"] == [0.75] and two["low"] == [0.5] and two["high"] == [1.0]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"x: expected a \[runs, tasks\] matrix.*shape \(3,\)"):
        compare([1, 2, 3], [[1.0]])
    with pytest.raises(ValueError, match=r"scores: non-finite scores at \(run, task\) \[\[0, 1\]\]"):
        iqm([[0.0, np.nan]])
    with pytest.raises(ValueError, match="same tasks"):
        probability_of_improvement([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="unknown aggregate"):
        interval_estimate([[1.0]], "median", reps=10)
