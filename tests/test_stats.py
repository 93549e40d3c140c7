"""`mixt5.stats` against hand computations with numpy/scipy on fixed per-question scores."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mixt5.stats import mean_ci, paired_bootstrap


def _em_scores(seed: int, n: int = 400, accuracy: float = 0.6) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < accuracy).astype(float) * 100


def test_mean_ci_matches_scipy_t_interval():
    values = [82.41, 83.05, 82.77, 82.12]
    low, high = scipy_stats.t.interval(0.95, df=len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    ci = mean_ci(values)
    assert ci.n == 4
    assert ci.mean == pytest.approx(np.mean(values))
    assert (ci.low, ci.high) == (pytest.approx(low), pytest.approx(high))
    assert ci.half_width == pytest.approx((high - low) / 2)
    assert ci.format() == f"{np.mean(values):.2f} ± {(high - low) / 2:.2f}"


def test_mean_ci_of_one_seed_has_no_interval():
    ci = mean_ci([81.5])
    assert (ci.mean, ci.low, ci.high, ci.n) == (81.5, None, None, 1)
    assert "no CI" in ci.format()


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [[1.0, 2.0]]])
def test_mean_ci_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="mean_ci"):
        mean_ci(bad)


def _hand_bootstrap(a, b, num_resamples, seed):
    """The documented algorithm, written out: one `integers(0, n, n)` draw per resample, percentile CI, and
    p = 2 (min(#<=0, #>=0) + 1) / (B + 1) capped at 1."""
    d = np.asarray(b, float) - np.asarray(a, float)
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    for i in range(num_resamples):
        means[i] = d[rng.integers(0, d.size, size=d.size)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    p = min(1.0, 2 * (min((means <= 0).sum(), (means >= 0).sum()) + 1) / (num_resamples + 1))
    return d.mean(), low, high, p


def test_paired_bootstrap_matches_hand_computation():
    baseline = _em_scores(0)
    candidate = np.where(np.random.default_rng(1).random(baseline.size) < 0.1, 100.0 - baseline, baseline)
    result = paired_bootstrap(baseline, candidate, num_resamples=2000, seed=7)
    mean, low, high, p = _hand_bootstrap(baseline, candidate, 2000, 7)
    assert result.mean_difference == pytest.approx(mean)
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))
    assert result.p_value == pytest.approx(p)
    assert (result.num_questions, result.num_resamples, result.seed) == (baseline.size, 2000, 7)


def test_a_versus_a_gives_a_large_p_value():
    scores = _em_scores(3)
    identical = paired_bootstrap(scores, scores, num_resamples=1000)
    assert identical.p_value == 1.0 and identical.mean_difference == 0.0
    # another "seed" of the same system: a few answers flip, as many each way
    flips = np.flatnonzero(np.random.default_rng(4).random(scores.size) < 0.06)
    right, wrong = flips[scores[flips] > 0], flips[scores[flips] == 0]
    k = min(right.size, wrong.size)
    other = scores.copy()
    other[right[:k]], other[wrong[:k]] = 0.0, 100.0
    noisy = paired_bootstrap(scores, other, num_resamples=1000)
    assert noisy.mean_difference == 0.0
    assert noisy.p_value > 0.5
    assert noisy.low < 0 < noisy.high


def test_a_clearly_better_arm_gives_a_small_p_value():
    baseline = _em_scores(5)
    wrong = np.flatnonzero(baseline == 0)
    better = baseline.copy()
    better[wrong[: len(wrong) // 4]] = 100.0  # a quarter of the misses fixed, nothing broken
    result = paired_bootstrap(baseline, better, num_resamples=1000)
    assert result.mean_difference > 0 and result.low > 0
    assert result.p_value == pytest.approx(2 / 1001)  # no resample on the far side of zero: the smallest p
    worse = paired_bootstrap(better, baseline, num_resamples=1000)
    assert worse.mean_difference == pytest.approx(-result.mean_difference) and worse.high < 0 and worse.p_value < 0.01


def test_paired_bootstrap_is_reproducible_and_seeded():
    a, b = _em_scores(6), _em_scores(7)
    assert paired_bootstrap(a, b, num_resamples=500, seed=1) == paired_bootstrap(a, b, num_resamples=500, seed=1)
    assert (
        paired_bootstrap(a, b, num_resamples=500, seed=1).low != paired_bootstrap(a, b, num_resamples=500, seed=2).low
    )


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap([1.0, 0.0], [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="num_resamples"):
        paired_bootstrap([1.0], [0.0], num_resamples=0)
