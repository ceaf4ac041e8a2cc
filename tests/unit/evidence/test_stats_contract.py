"""The statistics' stated policies at their edges (hdkd/evidence/stats.py's docstring): what is refused, where
"no spread" begins, the defaults a table's row shows, and the boundaries of a verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hdkd.evidence.stats import ALPHA, NO_SPREAD, Comparison, effect_size, mcnemar_exact, mean_std, paired_t, verdict


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
