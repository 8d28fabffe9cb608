"""Paired statistics of the study: per-seed differences between two models, their 95 % confidence interval and the
verdict on a claim.

Two runs of the same seed share the initial backbone weights, the data order and the augmentation draws, so the
difference of their metrics removes what the seed does to both. The interval is Student's t interval of the mean of
the per-seed differences, `mean ± t_{(1 + c) / 2, n - 1} · s / √n` (s the sample standard deviation of the n
differences, c the confidence): exact when the differences are normal, and what a paired t-test inverts. A claim
*holds* when the interval lies above 0 (the paper's direction), *fails* when it lies below 0, and is *inconclusive*
when it contains 0; with fewer than `MIN_SEEDS` seeds no verdict is given.

Beside the interval: the two-sided p-value of the paired t-test (`t_p_value`), a distribution-free check that does
not rest on normality (`sign_flip_p_value`: the exact sign-flip permutation test of the mean difference), and Holm's
step-down adjustment of the p-values of several claims tested together (`holm_adjusted`), which keeps the chance of
any false "holds" among them at most alpha.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_SEEDS = 5
METHOD = "Student t interval of the mean per-seed paired difference"

HOLDS, FAILS, INCONCLUSIVE, TOO_FEW_SEEDS = "holds", "fails", "inconclusive", "too few seeds"
INTERIM = "interim: no verdict before every planned seed"  # a pre-registered claim whose runs are not all done


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences `variant - reference` (signed so that positive is the paper's direction) and their
    t interval. `low`/`high` are None with fewer than two seeds."""

    differences: dict[int, float]
    mean: float
    std: Optional[float]
    low: Optional[float]
    high: Optional[float]
    confidence: float = CONFIDENCE
    p_value: Optional[float] = None  # two-sided paired t-test (`t_p_value`)
    p_sign_flip: Optional[float] = None  # two-sided exact sign-flip test (`sign_flip_p_value`)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.differences)

    @property
    def n(self) -> int:
        return len(self.differences)

    def verdict(self, min_seeds: int = MIN_SEEDS, adjusted_p: Optional[float] = None) -> str:
        return verdict(self, min_seeds, adjusted_p)

    def to_dict(self) -> dict:
        return {"differences": {str(seed): value for seed, value in sorted(self.differences.items())},
                "n": self.n, "mean": self.mean, "std": self.std, "low": self.low, "high": self.high,
                "confidence": self.confidence, "method": METHOD, "p_value": self.p_value,
                "p_sign_flip": self.p_sign_flip}  # fmt: skip


def paired_differences(variant: dict[int, float], reference: dict[int, float], sign: float = 1.0) -> dict[int, float]:
    """`sign * (variant[seed] - reference[seed])` for every seed both have (a seed one of them lacks is left out:
    an unpaired run says nothing about the difference)."""
    return {seed: sign * (variant[seed] - reference[seed]) for seed in sorted(variant.keys() & reference.keys())}


def t_interval(
    values: list[float], confidence: float = CONFIDENCE
) -> tuple[float, Optional[float], Optional[float], Optional[float]]:
    """(mean, sample standard deviation, low, high) of Student's t interval for the mean of `values`."""
    if not values:
        raise ValueError("No values: a confidence interval needs at least one paired difference.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"Non-finite paired difference in {values}.")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None, None
    std = statistics.stdev(values)
    half_width = stats.t.ppf((1 + confidence) / 2, df=len(values) - 1) * std / math.sqrt(len(values))
    return mean, std, mean - half_width, mean + half_width


def compare(variant: dict[int, float], reference: dict[int, float], sign: float = 1.0,
            confidence: float = CONFIDENCE) -> Optional[PairedDifference]:  # fmt: skip
    """The paired difference of two per-seed series (None when they share no seed)."""
    differences = paired_differences(variant, reference, sign)
    if not differences:
        return None
    values = list(differences.values())
    mean, std, low, high = t_interval(values, confidence)
    sign_flip = sign_flip_p_value(values) if len(values) <= 20 else None
    return PairedDifference(differences, mean, std, low, high, confidence, t_p_value(values), sign_flip)


def verdict(difference: PairedDifference, min_seeds: int = MIN_SEEDS, adjusted_p: Optional[float] = None) -> str:
    """holds / fails / inconclusive, or "too few seeds" below `min_seeds` paired seeds. Alone, a claim holds (fails)
    when its interval lies above (below) 0, that is when the t-test's p is below `1 - confidence`; tested with
    others, `adjusted_p` (Holm's, `holm_adjusted`) takes the place of p."""
    if difference.n < min_seeds or difference.low is None:
        return TOO_FEW_SEEDS
    if adjusted_p is None:
        if difference.low > 0:
            return HOLDS
        return FAILS if difference.high < 0 else INCONCLUSIVE
    if adjusted_p < 1 - difference.confidence:
        return HOLDS if difference.mean > 0 else FAILS
    return INCONCLUSIVE


def t_p_value(values: list[float]) -> Optional[float]:
    """Two-sided p-value of the paired t-test of "mean = 0" (below `1 - CONFIDENCE` exactly when the t interval
    excludes 0); None with fewer than two values. All-equal values give 0 when non-zero, 1 when zero (no spread)."""
    if len(values) < 2:
        return None
    mean, std = statistics.fmean(values), statistics.stdev(values)
    if std == 0:
        return 0.0 if mean != 0 else 1.0
    t = mean / (std / math.sqrt(len(values)))
    return float(2 * stats.t.sf(abs(t), df=len(values) - 1))


def sign_flip_p_value(values: list[float]) -> Optional[float]:
    """Exact two-sided p-value of the sign-flip permutation test of "mean = 0": under the null the sign of each
    paired difference is a fair coin, so p is the share of the 2^n sign patterns whose sum is at least as far from 0
    as the observed one (the observed pattern included). Needs no normality; its smallest possible value is
    2 / 2^n (1/16 with five seeds: five seeds can never reach 0.05). None without values; n above 20 is refused."""
    if not values:
        return None
    if len(values) > 20:
        raise ValueError(f"The exact sign-flip test enumerates 2^n patterns; n = {len(values)} is too many.")
    magnitudes = np.abs(np.asarray(values, dtype=float))
    sums = np.zeros(1)
    for magnitude in magnitudes:  # the signed sums of all 2^k patterns of the first k differences
        sums = np.concatenate([sums + magnitude, sums - magnitude])
    tolerance = 1e-12 * max(1.0, float(magnitudes.sum()))  # equal sums reached in another order still count as equal
    return float(np.count_nonzero(np.abs(sums) >= abs(sum(values)) - tolerance)) / sums.size


def holm_adjusted(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values: sort the m p-values ascending, multiply the i-th (from 0) by m - i, carry
    the running maximum forward and cap at 1. Claims whose adjusted p is below alpha are decided at family-wise
    error rate alpha."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    adjusted, running = {}, 0.0
    for index, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - index) * p))
        adjusted[name] = running
    return adjusted
