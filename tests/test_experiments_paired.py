"""experiments/paired.py: the paired t interval and the verdicts, on constructed examples with known answers."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments import paired


def test_t_interval_matches_a_hand_computation():
    # Differences 1..5: mean 3, sample std sqrt(2.5), standard error sqrt(2.5 / 5) = sqrt(0.5);
    # t_{0.975, 4} = 2.776445105 (tables), so the half width is 2.776445105 * sqrt(0.5) = 1.963243.
    mean, std, low, high = paired.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and std == pytest.approx(math.sqrt(2.5))
    assert low == pytest.approx(3.0 - 1.963243, abs=1e-6) and high == pytest.approx(3.0 + 1.963243, abs=1e-6)


def test_t_interval_agrees_with_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    variant, reference = rng.normal(1.0, 1.0, 7), rng.normal(0.0, 1.0, 7)
    difference = paired.compare(dict(enumerate(variant)), dict(enumerate(reference)))
    interval = stats.ttest_rel(variant, reference).confidence_interval(0.95)
    assert (difference.low, difference.high) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert difference.mean == pytest.approx(float(np.mean(variant - reference)))


def test_pairs_by_seed_and_signs_lower_is_better_metrics():
    # Seed 3 exists only in the variant: left out. Lower is better (sign -1): 2.0 vs 2.5 is an improvement of 0.5.
    difference = paired.compare({0: 2.0, 1: 1.0, 3: 9.0}, {0: 2.5, 1: 1.5}, sign=-1.0)
    assert difference.differences == {0: pytest.approx(0.5), 1: pytest.approx(0.5)}
    assert (
        difference.seeds == [0, 1] and difference.std == 0.0 and difference.low == difference.high == pytest.approx(0.5)
    )
    assert paired.compare({0: 1.0}, {1: 1.0}) is None  # no common seed


def test_verdicts_follow_the_interval_and_need_five_seeds():
    def verdict(values):
        return paired.compare(dict(enumerate(values)), {seed: 0.0 for seed in range(len(values))}).verdict()

    assert verdict([1.0, 2.0, 3.0, 4.0, 5.0]) == paired.HOLDS  # interval [1.04, 4.96]
    assert verdict([-1.0, -2.0, -3.0, -4.0, -5.0]) == paired.FAILS
    assert verdict([-2.0, -1.0, 0.0, 1.0, 2.0]) == paired.INCONCLUSIVE
    assert verdict([1.0, 2.0, 3.0, 4.0]) == paired.TOO_FEW_SEEDS  # excludes 0, but only four seeds
    assert verdict([1.0]) == paired.TOO_FEW_SEEDS
    single = paired.compare({0: 1.0}, {0: 0.0})
    assert single.low is None and single.std is None and single.mean == 1.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="No values"):
        paired.t_interval([])
    with pytest.raises(ValueError, match="Non-finite"):
        paired.t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        paired.t_interval([1.0, 2.0], confidence=1.5)
