"""Statistics across seeds: aggregates and paired comparisons of two models.

Policies (stated once, relied on by the report):

- **Aggregates** over seeds are the mean and the *sample* standard deviation (``ddof=1``); with one
  seed the standard deviation is undefined and is ``None`` (results are JSON, which has no NaN).
- **Paired t over seeds** is the verdict's test. Seed *s* of model A and seed *s* of model B share
  the training subset, the initial draws that seed fixes, and the test images, so the per-seed
  differences are the paired observations; the seeds are independent replicates of the whole
  training, which is what a t-interval needs. ``scipy.stats.ttest_rel`` gives the interval and
  the two-sided p-value. It needs at least two seeds and differences that vary (``None`` otherwise;
  differences that are all zero get p = 1). Its **effect size** is the mean difference over the
  sample std of the differences (``ddof=1``; Cohen's d_z), ``None`` for one seed or no spread.
- **Exact McNemar per seed** tests, for one trained pair, whether the two models err on the same
  test images (statsmodels' exact binomial McNemar on the discordant pairs). Its interval is the
  conditional exact (Clopper-Pearson) interval of the accuracy difference given the number of
  discordant images. Seeds are **not pooled**: they share the test images, so their discordant
  counts are not independent and neither summing them nor combining their p-values (Fisher,
  Stouffer) would keep the stated error rate. Each seed's test is reported on its own row.
- **Multiple comparisons**: the paired t p-values of one table (every comparison at every fraction
  and metric of the significance table; every Δ cell of one ablation table) are one family, Holm-adjusted
  (:func:`holm`, statsmodels' ``multipletests``), and the verdicts use the adjusted p. Holm controls the
  family-wise error rate under any dependence between the tests, which these share (the same runs
  appear in several comparisons). The McNemar rows are per-seed detail, outside the family.
  Where a report declares claims (``report.claims``), those paired tests are the **primary** family, adjusted
  on their own, and every other paired t row is **exploratory**, adjusted apart (:mod:`hdkd.evidence.aggregate`).
- **Seeds and power** (:func:`paired_t_power`, :func:`seeds_needed`, :func:`minimum_detectable_effect`): the
  power of the two-sided paired t over n seeds from the noncentral t (scipy), given the sample std of the
  per-seed differences a run measured. Within a Holm family of m tests the count uses α/m, Holm's first and
  strictest step (Bonferroni's level): the seeds it gives suffice for every claim, whatever its rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps
from scipy.optimize import brentq
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05  # the significance level of the report's verdicts
NO_SPREAD = 1e-12  # differences within this of each other are equal (rounding): no t, no effect size


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("no values to aggregate")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


@dataclass(frozen=True)
class Comparison:
    """One row of the significance table: A − B on one metric, by one test."""

    difference_mean: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str
    effect_size: float | None = None  # paired t: mean difference / its sample std

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def untested(self) -> str | None:
        """Why there is no p-value, or ``None`` when there is one: the one rule the tables and sentences
        share (:func:`paired_t`: one seed, or the same non-zero difference at every seed)."""
        if self.p_value is not None:
            return None
        return "one seed" if self.ci_low is None else "the same at every seed"


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """Paired t-interval and two-sided p-value of mean(A − B) over seeds (``a[i]``, ``b[i]``: seed i)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values need two equal-length, non-empty lists; got {a.shape} and {b.shape}")
    diff = a - b
    if diff.size < 2:
        return Comparison(float(diff.mean()), None, None, None, "paired_t")
    mean = float(diff.mean())
    if np.ptp(diff) <= NO_SPREAD:  # zero variance (up to rounding): t is undefined; all-zero is no evidence
        p = 1.0 if abs(mean) <= NO_SPREAD else None
        return Comparison(mean, mean, mean, p, "paired_t")
    result = sps.ttest_rel(a, b)
    ci = result.confidence_interval(confidence_level=level)
    return Comparison(mean, float(ci.low), float(ci.high), _finite_or_none(result.pvalue), "paired_t",
                      effect_size(diff))


def effect_size(differences: Sequence[float]) -> float | None:
    """Mean paired difference over the sample std of the differences (``ddof=1``); ``None`` where that is
    undefined: one difference, or no spread."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2 or np.ptp(d) <= NO_SPREAD:
        return None
    return float(d.mean() / d.std(ddof=1))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values of one family, in the given order; ``None`` (no test) stays ``None`` and is not
    counted in the family."""
    tested = [i for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    if tested:
        for i, p in zip(tested, multipletests([p_values[i] for i in tested], method="holm")[1]):
            adjusted[i] = float(p)
    return adjusted


def paired_t_power(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` over ``n`` pairs, for a true mean difference of
    ``effect`` standard deviations of the differences (d_z): both tails of the noncentral t on n - 1 degrees of
    freedom, noncentrality ``effect * sqrt(n)`` (as statsmodels' ``TTestPower``)."""
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    df, nc = n - 1, effect * math.sqrt(n)
    crit = sps.t.ppf(1 - alpha / 2, df)

    def upper_tail(noncentrality: float) -> float:
        p = float(sps.nct.sf(crit, df, noncentrality))
        # scipy's nct is NaN at a noncentrality of ~5e9 and beyond (a difference of billions of sds, which per-seed
        # differences that barely vary give): there the normal limit is exact to double precision
        return p if math.isfinite(p) else float(sps.norm.sf(crit - noncentrality))

    # the lower tail as the upper tail of the mirrored distribution: scipy's nct.cdf turns NaN in far tails
    return min(1.0, upper_tail(nc) + upper_tail(-nc))


MAX_SEEDS = 10_000  # seeds_needed gives up beyond this


def seeds_needed(difference: float, sd: float | None, alpha: float = ALPHA, power: float = 0.8) -> int | None:
    """The fewest seeds (pairs, at least 2) whose two-sided paired t at level ``alpha`` detects a true mean
    difference ``difference`` with probability ``power``, when the per-seed differences have sample std ``sd``;
    ``None`` where that is undefined (no std: one seed; no spread: every seed gave the same difference, which
    estimates no variance) or beyond :data:`MAX_SEEDS`."""
    if sd is None or not math.isfinite(sd) or sd <= NO_SPREAD:
        return None
    effect = abs(difference) / sd
    low, high = 1, 2  # power grows with n: find a large enough n by doubling, then the first by bisection
    while paired_t_power(effect, high, alpha) < power:
        if high >= MAX_SEEDS:
            return None
        low, high = high, min(2 * high, MAX_SEEDS)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if paired_t_power(effect, middle, alpha) >= power else (middle, high)
    return high


def minimum_detectable_effect(sd: float | None, n: int, alpha: float = ALPHA, power: float = 0.8) -> float | None:
    """The smallest true mean difference the two-sided paired t at level ``alpha`` over ``n`` seeds detects with
    probability ``power``, when the per-seed differences have sample std ``sd`` (in ``sd``'s units); ``None``
    where undefined (fewer than 2 seeds, no std, no spread)."""
    if sd is None or n < 2 or not math.isfinite(sd) or sd <= NO_SPREAD:
        return None
    high = 1.0
    while paired_t_power(high, n, alpha) < power:
        high *= 2
    return float(brentq(lambda d: paired_t_power(d, n, alpha) - power, 0.0, high, xtol=1e-10)) * sd


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool], level: float = 0.95,
                  label: str = "mcnemar_exact") -> Comparison:
    """Exact McNemar test of one pair of trained models on the same images (per-image correctness).

    ``difference_mean`` is accuracy(A) − accuracy(B) = (n10 − n01) / N, with n10 the images only A
    gets right. Given the n = n10 + n01 discordant images, n10 ~ Binomial(n, π) and the difference is
    (2π − 1)·n / N: the Clopper-Pearson interval of π maps to the interval of the difference.
    """
    ca, cb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if ca.shape != cb.shape or ca.ndim != 1 or ca.size == 0:
        raise ValueError(f"per-image correctness needs two equal-length, non-empty lists; got {ca.shape}, {cb.shape}")
    total = ca.size
    n10 = int(np.sum(ca & ~cb))
    n01 = int(np.sum(~ca & cb))
    discordant = n10 + n01
    diff = (n10 - n01) / total
    if discordant == 0:  # identical errors: no evidence of a difference, and none possible
        return Comparison(0.0, 0.0, 0.0, 1.0, label)
    table = [[int(np.sum(ca & cb)), n10], [n01, int(np.sum(~ca & ~cb))]]
    p = float(mcnemar(table, exact=True).pvalue)
    ci = sps.binomtest(n10, discordant).proportion_ci(confidence_level=level, method="exact")
    scale = discordant / total
    return Comparison(diff, (2 * ci.low - 1) * scale, (2 * ci.high - 1) * scale, min(p, 1.0), label)


def verdict(comparison: Comparison, alpha: float = ALPHA) -> str:
    """``significant`` / ``not significant`` at ``alpha``, or why there is no test."""
    if comparison.untested:
        return f"no test ({comparison.untested})"
    return "significant" if comparison.p_value < alpha else "not significant"
