"""The statistics' stated policies at their edges (hdkd/evidence/stats.py's docstring): what is refused, where
"no spread" begins, the defaults a table's row shows, and the boundaries of a verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hdkd.evidence.stats import (
    ALPHA,
    MAX_SEEDS,
    NO_SPREAD,
    Comparison,
    effect_size,
    mcnemar_exact,
    mean_std,
    minimum_detectable_effect,
    paired_t,
    paired_t_power,
    seeds_needed,
    verdict,
)


def test_mean_std_of_two_values_has_a_sample_std_and_no_values_are_refused_by_name():
    assert mean_std([0.8, 1.0]) == (pytest.approx(0.9), pytest.approx(math.sqrt(0.02)))
    with pytest.raises(ValueError, match="^no values to aggregate$"):
        mean_std([])


def test_effect_size_is_defined_from_two_differences():
    assert effect_size([0.1, 0.3]) == pytest.approx(0.2 / np.std([0.1, 0.3], ddof=1))


@pytest.mark.parametrize("a, b", [
    ([[0.9, 0.8]], [[0.8, 0.7]]),  # seeds must be one list, not a matrix
    ([0.9, 0.8, 0.7], [0.9, 0.8]),
    ([], []),
])
def test_paired_t_refuses_what_is_not_two_equal_lists(a, b):
    with pytest.raises(ValueError, match="equal-length, non-empty"):
        paired_t(a, b)


def test_paired_t_no_spread_row_is_a_point_interval_of_the_paired_t():
    # the same non-zero difference at every seed: no p, the interval is the difference itself
    c = paired_t([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert (c.ci_low, c.ci_high) == (pytest.approx(0.1), pytest.approx(0.1))
    assert c.test == "paired_t" and c.p_value is None and c.effect_size is None
    zero = paired_t([0.9, 0.8], [0.9, 0.8])
    assert zero.test == "paired_t" and zero.ci_high == 0.0


def test_no_spread_is_inclusive_of_its_threshold():
    # "differences within NO_SPREAD of each other are equal": a spread of exactly NO_SPREAD is no spread (and
    # differences that small are zero: p = 1, a point interval)
    c = paired_t([NO_SPREAD, 0.0], [0.0, 0.0])
    assert c.p_value == 1.0 and c.ci_low == c.ci_high == pytest.approx(NO_SPREAD / 2)
    assert effect_size([NO_SPREAD, 0.0]) is None
    # a mean difference of exactly NO_SPREAD is a zero difference: p = 1
    assert paired_t([NO_SPREAD, NO_SPREAD], [0.0, 0.0]).p_value == 1.0


def test_a_non_finite_p_value_is_none_not_nan():
    # results are JSON, which has no NaN: a t that cannot be computed leaves the row untested
    c = paired_t([math.inf, 1.0], [0.0, 0.0])
    assert c.p_value is None


def test_verdict_is_significant_strictly_below_alpha():
    at = Comparison(0.1, 0.0, 0.2, ALPHA, "paired_t")
    below = Comparison(0.1, 0.0, 0.2, ALPHA - 1e-9, "paired_t")
    assert verdict(at) == "not significant" and verdict(below) == "significant"
    assert verdict(Comparison(0.1, 0.0, 0.2, 0.01, "paired_t"), alpha=0.01) == "not significant"


@pytest.mark.parametrize("a, b", [
    ([[True, False]], [[False, True]]),  # one list of images, not a matrix
    ([True, False, True], [True, False]),
    ([], []),
])
def test_mcnemar_refuses_what_is_not_two_equal_lists_naming_the_shapes(a, b):
    with pytest.raises(ValueError, match=r"equal-length, non-empty lists; got \("):
        mcnemar_exact(a, b)


def test_mcnemar_of_one_image():
    c = mcnemar_exact([True], [False])
    assert c.difference_mean == 1.0 and c.p_value == 1.0


def test_mcnemar_identical_errors_row():
    same = mcnemar_exact([True, False, True], [True, False, True])
    assert same == Comparison(0.0, 0.0, 0.0, 1.0, "mcnemar_exact")


def test_mcnemar_row_is_labelled_and_its_interval_follows_the_level():
    ca = np.array([True] * 12 + [False] * 3 + [True] * 5)
    cb = np.array([False] * 12 + [True] * 3 + [True] * 5)
    c95, c80 = mcnemar_exact(ca, cb), mcnemar_exact(ca, cb, level=0.80)
    assert c95.test == "mcnemar_exact" and mcnemar_exact(ca, cb, label="seed 1").test == "seed 1"
    assert c95.ci_low < c80.ci_low < c95.difference_mean < c80.ci_high < c95.ci_high
    assert c80.p_value == c95.p_value


# ----------------------------------------------------------------------------------------- seeds and power
@pytest.mark.parametrize("effect, fewest", [(5.0, 3), (3.0, 4), (1.3, 7), (1.1, 9), (0.7, 19)])
def test_seeds_needed_is_the_fewest_seeds_with_the_power_asked_for(effect, fewest):
    # "the fewest seeds (pairs, at least 2) whose paired t detects the difference with probability power": every
    # count below falls short; the difference's sign does not matter (two-sided); a whole number of seeds
    sd = 0.02
    n = seeds_needed(effect * sd, sd)
    assert n == fewest and isinstance(n, int)
    assert paired_t_power(effect, n) >= 0.8 > paired_t_power(effect, n - 1)
    assert seeds_needed(-effect * sd, sd) == fewest


def test_no_spread_of_the_differences_is_inclusive_of_its_threshold_for_power_too():
    # differences whose std is NO_SPREAD estimate no variance, whatever the difference asked for
    assert seeds_needed(NO_SPREAD / 2, NO_SPREAD) is None and minimum_detectable_effect(NO_SPREAD, 5) is None
    assert seeds_needed(1e-12, 2 * NO_SPREAD) == seeds_needed(0.5, 1.0)  # the same effect, 0.5 sd
    assert minimum_detectable_effect(2 * NO_SPREAD, 5) == pytest.approx(2 * NO_SPREAD * minimum_detectable_effect(1, 5))


@pytest.mark.parametrize("n", [2, 20])
def test_minimum_detectable_effect_from_two_seeds_up_has_the_power_asked_for(n):
    # two seeds are enough for a paired t (a detectable effect of 11.5 sd); twenty detect less than one sd
    from statsmodels.stats.power import TTestPower

    mde = minimum_detectable_effect(0.02, n)
    assert mde == pytest.approx(0.02 * TTestPower().solve_power(nobs=n, alpha=ALPHA, power=0.8), rel=1e-6)
    assert paired_t_power(mde / 0.02, n) == pytest.approx(0.8, abs=1e-7)
    assert (mde > 0.02) == (n == 2)


def test_power_of_fewer_than_two_pairs_is_refused_naming_the_count():
    with pytest.raises(ValueError, match="^a paired t-test needs at least 2 pairs, got 1$"):
        paired_t_power(0.5, 1)


def test_seeds_needed_detects_a_large_enough_difference_up_to_the_limit_and_gives_up_beyond():
    n = seeds_needed(0.04, 1.0)  # 0.04 sd: about 4,900 seeds, within MAX_SEEDS
    assert n <= MAX_SEEDS and paired_t_power(0.04, n) >= 0.8 > paired_t_power(0.04, n - 1)
    assert seeds_needed(0.001, 1.0) is None  # millions of seeds


def test_seeds_needed_gives_up_beyond_max_seeds():
    # "None ... beyond MAX_SEEDS": 0.0267 sd needs about 11,000 seeds
    assert seeds_needed(0.0267, 1.0) is None


def test_an_enormous_effect_is_detected_for_sure():
    # per-seed differences with a std just above NO_SPREAD: a 1.5-point difference is ~1e10 sd, detected by 2 seeds
    assert paired_t_power(1e10, 3) == pytest.approx(1.0)
    assert seeds_needed(0.015, 2 * NO_SPREAD) == 2
