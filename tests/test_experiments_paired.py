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


def test_two_sided_t_p_value_against_the_closed_form_of_two_degrees_of_freedom():
    # Student's t with 2 degrees of freedom has the CDF 1/2 + t / (2 sqrt(2 + t^2)); [1, 2, 3]: mean 2, sd 1.
    t = 2 / (1 / math.sqrt(3))
    expected = 2 * (0.5 - t / (2 * math.sqrt(2 + t * t)))
    assert paired.t_p_value([1.0, 2.0, 3.0]) == pytest.approx(expected, rel=1e-12)
    assert paired.t_p_value([-1.0, -2.0, -3.0]) == pytest.approx(expected, rel=1e-12)
    assert paired.t_p_value([2.0, 2.0]) == 0.0 and paired.t_p_value([0.0, 0.0]) == 1.0
    assert paired.t_p_value([1.0]) is None
    # Below 0.05 exactly when the 95 % interval excludes 0.
    for values in ([0.1, 1.9, 2.2, 0.4, 1.5], [0.1, 1.9, -2.2, 0.4, 1.5]):
        _, _, low, high = paired.t_interval(values)
        assert (paired.t_p_value(values) < 0.05) == (low > 0 or high < 0)


def test_exact_sign_flip_p_values_counted_by_hand():
    # Magnitudes 1, 2, 3: the eight signed sums are 6, 4, 2, 0, 0, -2, -4, -6.
    assert paired.sign_flip_p_value([1.0, 2.0, 3.0]) == 2 / 8  # 6 and -6 are as far from 0 as the observed 6
    assert paired.sign_flip_p_value([1.0, -2.0, 3.0]) == 6 / 8  # every sum but the two zeros reaches |2|
    assert paired.sign_flip_p_value([-1.0, -2.0, -3.0]) == 2 / 8
    # Five seeds all in one direction: the smallest p the test can give, 2/32 (never below 0.05).
    assert paired.sign_flip_p_value([0.5, 1.0, 1.5, 2.0, 2.5]) == 1 / 16
    assert paired.sign_flip_p_value([]) is None
    with pytest.raises(ValueError, match="too many"):
        paired.sign_flip_p_value([1.0] * 21)


def test_holm_adjustment_by_hand():
    # Sorted: a 0.01 x 3 = 0.03; c 0.03 x 2 = 0.06; b 0.04 x 1 = 0.04, raised to the running maximum 0.06.
    adjusted = paired.holm_adjusted({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert paired.holm_adjusted({"x": 0.6, "y": 0.5}) == {"y": 1.0, "x": 1.0}  # capped at 1
    assert paired.holm_adjusted({}) == {}
    # Seven claims: the smallest p is multiplied by 7 (0.014 -> 0.098), so it no longer holds at 0.05.
    seven = paired.holm_adjusted({f"claim{i}": p for i, p in enumerate([0.014, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])})
    assert seven["claim0"] == pytest.approx(0.098)


def test_sign_flip_p_value_equals_an_explicit_enumeration_of_the_sign_patterns():
    import itertools

    values = list(np.random.default_rng(7).normal(0.4, 1.0, size=9))
    observed = abs(sum(values))
    patterns = list(itertools.product((1, -1), repeat=len(values)))
    counted = sum(abs(sum(s * abs(v) for s, v in zip(signs, values))) >= observed - 1e-9 for signs in patterns)
    assert paired.sign_flip_p_value(values) == counted / len(patterns)
