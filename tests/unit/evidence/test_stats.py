"""Statistics across seeds: hand-computed cases, checked against scipy / statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from hdkd.evidence.stats import (
    effect_size,
    holm,
    mcnemar_exact,
    mean_std,
    minimum_detectable_effect,
    paired_t,
    paired_t_power,
    seeds_needed,
    verdict,
)


def test_mean_and_sample_std():
    mean, std = mean_std([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert std == pytest.approx(0.1)  # sample std: sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert mean_std([0.7]) == (0.7, None)


def test_paired_t_hand_computed():
    # differences 0.10, 0.05, 0.05: mean 1/15, sd 0.05/sqrt(3), se 1/60, t = 4 on 2 df.
    a, b = [0.90, 0.80, 0.85], [0.80, 0.75, 0.80]
    c = paired_t(a, b)
    t_crit = 4.302652729911275  # t_{0.975, 2}
    assert c.difference_mean == pytest.approx(1 / 15)
    assert c.ci_low == pytest.approx(1 / 15 - t_crit / 60)
    assert c.ci_high == pytest.approx(1 / 15 + t_crit / 60)
    # t cdf on 2 df in closed form: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert c.p_value == pytest.approx(2 * (0.5 - 4 / (2 * math.sqrt(18))))
    assert c.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert c.test == "paired_t"
    assert verdict(c) == "not significant"  # p = 0.057


def test_holm_hand_computed():
    # sorted p 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> made monotone: 0.03, 0.06, 0.06; back in order
    p = [0.01, 0.04, 0.03]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06])
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    # a row without a test stays without one and is not counted in the family
    assert holm([0.01, None, 0.04, 0.03]) == [pytest.approx(0.03), None, pytest.approx(0.06), pytest.approx(0.06)]
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([None]) == [None] and holm([]) == []


def test_effect_size_hand_computed():
    # differences 0.10, 0.05, 0.05: mean 1/15, sample sd 0.05/sqrt(3) -> d = 4/sqrt(3)
    assert effect_size([0.10, 0.05, 0.05]) == pytest.approx(4 / math.sqrt(3))
    assert effect_size([-0.10, -0.05, -0.05]) == pytest.approx(-4 / math.sqrt(3))
    c = paired_t([0.90, 0.80, 0.85], [0.80, 0.75, 0.80])
    assert c.effect_size == pytest.approx(4 / math.sqrt(3))
    assert c.effect_size == pytest.approx(c.difference_mean / np.std([0.10, 0.05, 0.05], ddof=1))
    # undefined: one seed, or no spread
    assert effect_size([0.1]) is None and effect_size([0.1, 0.1]) is None
    assert paired_t([0.9], [0.8]).effect_size is None and paired_t([0.9, 0.8], [0.8, 0.7]).effect_size is None
    assert mcnemar_exact([True, False], [False, False]).effect_size is None  # McNemar rows have none


def test_paired_t_sign_follows_the_order():
    c = paired_t([0.80, 0.75, 0.80], [0.90, 0.80, 0.85])
    assert c.difference_mean == pytest.approx(-1 / 15) and c.ci_high < 0.02


def test_paired_t_edge_cases():
    one = paired_t([0.9], [0.8])
    assert one.difference_mean == pytest.approx(0.1) and one.p_value is None and one.ci_low is None
    assert verdict(one).startswith("no test")
    same = paired_t([0.9, 0.8], [0.9, 0.8])
    assert (same.difference_mean, same.p_value) == (0.0, 1.0)
    constant = paired_t([0.9, 0.8], [0.8, 0.7])
    assert constant.p_value is None and constant.ci_low == pytest.approx(0.1)
    assert (one.untested, same.untested, constant.untested) == ("one seed", None, "the same at every seed")
    assert verdict(constant) == "no test (the same at every seed)"
    with pytest.raises(ValueError, match="equal-length"):
        paired_t([0.9, 0.8], [0.9])


def test_mcnemar_exact_hand_computed():
    # 20 images: 8 only A gets right, 2 only B, 6 both, 4 neither.
    ca = np.array([1] * 8 + [0] * 2 + [1] * 6 + [0] * 4, dtype=bool)
    cb = np.array([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4, dtype=bool)
    c = mcnemar_exact(ca, cb)
    assert c.difference_mean == pytest.approx((8 - 2) / 20)
    assert c.p_value == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 2 P(X <= 2), X ~ Bin(10, 1/2)
    assert c.p_value == pytest.approx(mcnemar([[6, 8], [2, 4]], exact=True).pvalue)
    ci = sps.binomtest(8, 10).proportion_ci(method="exact")
    assert c.ci_low == pytest.approx((2 * ci.low - 1) * 10 / 20)
    assert c.ci_high == pytest.approx((2 * ci.high - 1) * 10 / 20)
    assert c.ci_low < c.difference_mean < c.ci_high
    swapped = mcnemar_exact(cb, ca)
    assert swapped.difference_mean == pytest.approx(-c.difference_mean)
    assert swapped.p_value == pytest.approx(c.p_value)


def test_mcnemar_significant_and_identical():
    ca = np.ones(40, dtype=bool)
    cb = np.array([True] * 25 + [False] * 15)
    assert mcnemar_exact(ca, cb).p_value == pytest.approx(2 * 0.5**15)
    assert verdict(mcnemar_exact(ca, cb)) == "significant"
    same = mcnemar_exact(cb, cb)
    assert (same.difference_mean, same.p_value) == (0.0, 1.0)


def test_seeds_needed_and_the_detectable_difference_hand_computed_and_against_statsmodels():
    from statsmodels.stats.power import TTestPower

    # by hand: with no true difference a two-sided test rejects at its level (both tails of the central t)
    assert paired_t_power(0.0, 5, 0.05) == pytest.approx(0.05)
    # Cohen's table: a paired t at d_z = 0.5, two-sided 0.05, 80 % power needs 34 pairs (33 give 0.79)
    assert seeds_needed(0.5, 1.0, 0.05) == 34
    assert paired_t_power(0.5, 34, 0.05) >= 0.8 > paired_t_power(0.5, 33, 0.05)
    # 1.5 points with per-seed differences of sd 1 or 2 points, in a family of 9 at alpha / 9 (conservative)
    for sd, alpha in ((0.01, 0.05 / 9), (0.02, 0.05 / 9), (0.005, 0.05)):
        n = seeds_needed(0.015, sd, alpha)
        assert n == math.ceil(TTestPower().solve_power(effect_size=0.015 / sd, alpha=alpha, power=0.8))
        assert paired_t_power(0.015 / sd, n, alpha) == pytest.approx(TTestPower().power(0.015 / sd, n, alpha))
        mde = minimum_detectable_effect(sd, 5, alpha)
        assert mde == pytest.approx(TTestPower().solve_power(nobs=5, alpha=alpha, power=0.8) * sd, rel=1e-6)
    assert seeds_needed(0.015, 0.01, 0.05 / 9) == 10 and round(100 * minimum_detectable_effect(0.01, 5, 0.05 / 9), 2) == 3.07
    # undefined: one seed (no std), one seed used, no spread (the same difference at every seed estimates none)
    assert seeds_needed(0.015, None) is None and minimum_detectable_effect(None, 5) is None
    assert minimum_detectable_effect(0.01, 1) is None
    assert seeds_needed(0.015, 0.0) is None and minimum_detectable_effect(0.0, 3) is None
