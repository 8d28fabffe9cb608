"""Paired statistics of the study: per-seed differences between two models, their 95 % confidence interval and the
verdict on a claim.

Two runs of the same seed share the initial backbone weights, the data order and the augmentation draws, so the
difference of their metrics removes what the seed does to both. The interval is Student's t interval of the mean of
the per-seed differences, `mean ± t_{(1 + c) / 2, n - 1} · s / √n` (s the sample standard deviation of the n
differences, c the confidence): exact when the differences are normal, and what a paired t-test inverts. A claim
*holds* when the interval lies above 0 (the paper's direction), *fails* when it lies below 0, and is *inconclusive*
when it contains 0; with fewer than `MIN_SEEDS` seeds no verdict is given.
"""

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from scipy import stats

CONFIDENCE = 0.95
MIN_SEEDS = 5
METHOD = "Student t interval of the mean per-seed paired difference"

HOLDS, FAILS, INCONCLUSIVE, TOO_FEW_SEEDS = "holds", "fails", "inconclusive", "too few seeds"


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

    @property
    def seeds(self) -> list[int]:
        return sorted(self.differences)

    @property
    def n(self) -> int:
        return len(self.differences)

    def verdict(self, min_seeds: int = MIN_SEEDS) -> str:
        return verdict(self, min_seeds)

    def to_dict(self) -> dict:
        return {"differences": {str(seed): value for seed, value in sorted(self.differences.items())},
                "n": self.n, "mean": self.mean, "std": self.std, "low": self.low, "high": self.high,
                "confidence": self.confidence, "method": METHOD}  # fmt: skip


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
    mean, std, low, high = t_interval(list(differences.values()), confidence)
    return PairedDifference(differences, mean, std, low, high, confidence)


def verdict(difference: PairedDifference, min_seeds: int = MIN_SEEDS) -> str:
    """holds / fails / inconclusive from the interval, or "too few seeds" below `min_seeds` paired seeds."""
    if difference.n < min_seeds or difference.low is None:
        return TOO_FEW_SEEDS
    if difference.low > 0:
        return HOLDS
    if difference.high < 0:
        return FAILS
    return INCONCLUSIVE
