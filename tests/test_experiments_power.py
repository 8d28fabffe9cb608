"""experiments/power.py: power of the paired t-test against published values and a simulation, the seeds it asks
for, the pooled noise and its upper bound."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments import power, study

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_power_matches_published_sample_sizes():
    # Paired t-test, two-sided α = 0.05, power 0.8 (G*Power's "difference between two dependent means"): effect size
    # d = 0.5 needs 34 pairs (power 0.8078), d = 1 needs 10 (power 0.8031).
    assert power.required_seeds(sigma=2.0, difference=1.0) == 34
    assert power.power(34, sigma=2.0, difference=1.0) == pytest.approx(0.8078, abs=5e-4)
    assert power.required_seeds(sigma=1.0, difference=1.0) == 10
    assert power.power(10, sigma=1.0, difference=1.0) == pytest.approx(0.8031, abs=5e-4)
    assert power.power(33, sigma=2.0, difference=1.0) < 0.8 <= power.power(34, sigma=2.0, difference=1.0)


def test_power_matches_a_simulation():
    rng = np.random.default_rng(0)
    n, sigma, difference, trials = 6, 1.5, 1.2, 20_000
    samples = rng.normal(difference, sigma, (trials, n))
    statistic = samples.mean(axis=1) / (samples.std(axis=1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(statistic) > stats.t.ppf(0.975, n - 1))
    assert power.power(n, sigma, difference) == pytest.approx(rejected, abs=0.01)


def test_detectable_difference_inverts_the_power():
    difference = power.detectable_difference(8, sigma=1.3)
    assert power.power(8, sigma=1.3, difference=difference) == pytest.approx(power.TARGET_POWER, abs=1e-6)
    assert power.detectable_difference(1, sigma=1.0) == math.inf
    assert power.required_seeds(sigma=100.0, max_seeds=50) is None


def test_pooled_std_and_its_upper_bound():
    # Two samples about their own means: squares 2 + 8 over 1 + 2 degrees of freedom.
    sigma, df = power.pooled_std([[1.0, 3.0], [0.0, 2.0, 4.0]])
    assert df == 3 and sigma == pytest.approx(math.sqrt(10 / 3))
    # Upper bound: sigma * sqrt(df / chi2_{0.2, df}); chi2_{0.2, 3} = 1.005174 (tables).
    assert power.sigma_upper_bound(sigma, df, level=0.8) == pytest.approx(sigma * math.sqrt(3 / 1.005174), rel=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        power.pooled_std([[1.0]])


def test_power_with_many_seeds_matches_the_normal_approximation():
    # With hundreds of seeds t is nearly normal: power ≈ Φ(δ√n/σ - z_{0.975}) (the other tail is negligible).
    n, sigma = 400, 10.0
    expected = stats.norm.cdf(math.sqrt(n) / sigma - stats.norm.ppf(0.975))
    assert power.power(n, sigma, 1.0) == pytest.approx(expected, abs=0.005)


def test_bigger_recipe_is_judged_on_the_same_cpu_time():
    # Costs per run of the pilot (seconds) and the full study's total: the bigger recipe costs `ratio` times more per
    # run, so the same total affords fewer seeds; at that many seeds, the noise that still resolves 1 point.
    from experiments import study

    per_run = {"taskexpert": 300.0, "single-task": 120.0, "modsquad": 800.0}
    estimate = {"sigma": 4.0, "cpu": {"per_run_seconds": per_run, "total_seconds": 400_000.0}}
    bigger = power.bigger_recipe(estimate)
    ratio = power.training_flops(power.BIGGER_RECIPE) / power.training_flops("hub_configs/synthetic-tiny.yaml")
    assert bigger["cost_ratio"] == pytest.approx(ratio) and ratio > 1
    per_seed = sum(
        per_run[power._cost_kind(v.name)] for v in study.VARIANTS if v.name not in study.DESCRIPTIVE_VARIANTS
    )
    assert bigger["affordable_seeds"] == int(400_000.0 // (ratio * per_seed))
    assert power.detectable_difference(bigger["affordable_seeds"], bigger["sigma_needed"]) == pytest.approx(
        1.0, rel=1e-6
    )
    assert bigger["sigma_ratio"] == pytest.approx(4.0 / bigger["sigma_needed"])


def test_the_pre_registered_seeds_follow_from_the_stated_noise_effect_and_cap():
    """experiments/preregistration.md: each claim's seeds detect a 2-point Δm difference with 80 % power at
    α = 0.05 / 5 from the per-comparison noise measured before, capped at 10 by the CPU budget."""
    claims = [c.name for c in study.COMPARISONS if c.claim]
    assert sorted(study.PLAN_CLAIM_SEEDS) == sorted(claims) == sorted(study.PLAN_NOISE)
    for name in claims:
        needed = power.required_seeds(
            study.PLAN_NOISE[name], study.PLAN_EFFECT, study.PLAN_POWER, study.PLAN_ALPHA / len(claims)
        )
        assert study.PLAN_CLAIM_SEEDS[name] == min(needed, study.PLAN_SEED_CAP), name
    plan = (REPO_ROOT / "experiments" / "preregistration.md").read_text()
    for name in claims:  # the document states the same numbers
        assert f"| {name} | {study.PLAN_NOISE[name]:.2f} |" in plan, name


@pytest.mark.parametrize("n, sigma, difference, alpha", [(2, 2.5, 2.0, 0.01), (2, 0.23, 2.0, 0.01), (5, 1.0, 1.0, 0.05),
                                                         (40, 3.39, 2.0, 0.01)])  # fmt: skip
def test_power_equals_the_noncentral_t_at_any_degrees_of_freedom(n, sigma, difference, alpha):
    """P(|T| > c) for T noncentral t (scipy) with n - 1 degrees of freedom. With one degree of freedom the earlier
    integration over V gave about 1e-44 for the first case (the χ² density's pole at 0 was missed)."""
    df, critical, shift = n - 1, stats.t.ppf(1 - alpha / 2, n - 1), difference * math.sqrt(n) / sigma
    expected = stats.nct.sf(critical, df, shift) + stats.nct.sf(critical, df, -shift)
    assert power.power(n, sigma, difference, alpha) == pytest.approx(expected, rel=1e-6)
