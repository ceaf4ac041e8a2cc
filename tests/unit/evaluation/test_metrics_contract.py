"""The metrics' stated policies (hdkd/evaluation/metrics.py's docstring) where a user reads them: the keys of
metrics.json, the defaults, a class absent from the split, the edges of the inputs refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hdkd.evaluation.metrics import (
    bootstrap_replicates,
    classification_metrics,
    expected_calibration_error,
    roc_auc_one_vs_rest,
)


def _probs(pred, n_classes, top=0.8):
    probs = np.full((len(pred), n_classes), (1 - top) / (n_classes - 1))
    probs[np.arange(len(pred)), pred] = top
    return probs


def test_an_absent_class_scores_f1_zero_in_every_bootstrap_resample():
    # class 2 neither occurs nor is predicted; the others are always right: F1 = (1 + 1 + 0) / 3 in every resample
    y = np.array([0, 1] * 10)
    reps = bootstrap_replicates(y, y.copy(), 3, resamples=50, seed=0)
    assert reps["f1_macro"] == pytest.approx(np.full(50, 2 / 3))
    assert reps["accuracy"] == pytest.approx(np.ones(50))
    m = classification_metrics(y, _probs(y, 3), ["a", "b", "c"], bootstrap=50)
    assert m["f1_macro"] == pytest.approx(2 / 3) and m["ci"]["f1_macro"] == pytest.approx([2 / 3, 2 / 3])


def test_the_confusion_matrix_has_a_row_and_a_column_for_every_class():
    y = np.array([0, 1, 1, 0])  # class "c": absent and never predicted
    m = classification_metrics(y, _probs(np.array([0, 1, 0, 0]), 3), ["a", "b", "c"], bootstrap=0)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 0, 0]]


def test_an_absent_class_gives_no_warning():
    # the policy scores it 0: sklearn's "ill-defined" warning would only repeat that in the stage's log
    y = np.array([0, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, _probs(np.array([0, 1, 2, 0]), 3), ["a", "b", "c"], bootstrap=0)
    assert m["per_class"][2]["precision"] == 0.0 and m["classes_absent"] == ["c"]


def test_metrics_json_keys_and_defaults():
    y = np.array([0, 1, 2] * 10)
    m = classification_metrics(y, _probs(y, 3), ["a", "b", "c"])
    assert m["n"] == 30
    assert m["ece_bins"] == 15 and m["ece"] == pytest.approx(expected_calibration_error(y, _probs(y, 3), 15))
    assert set(m["ci"]) == {"level", "resamples", "seed", "method", "accuracy", "f1_macro"}
    assert {k: m["ci"][k] for k in ("level", "resamples", "seed", "method")} == {
        "level": 0.95, "resamples": 1000, "seed": 0, "method": "percentile"}


def test_the_ece_bins_asked_for_are_the_ones_used_and_reported():
    y = np.array([0, 1])
    probs = np.array([[0.54, 0.46], [0.58, 0.42]])  # confidence 0.54 right, 0.58 wrong
    m = classification_metrics(y, probs, ["a", "b"], ece_bins=2, bootstrap=0)
    assert m["ece_bins"] == 2 and m["ece"] == pytest.approx(abs(1 - 1.12) / 2)  # one bin (0.5, 1]
    m16 = classification_metrics(y, probs, ["a", "b"], ece_bins=16, bootstrap=0)
    assert m16["ece"] == pytest.approx((0.46 + 0.58) / 2)  # (0.5, 0.5625] and (0.5625, 0.625]


def test_ece_default_is_fifteen_equal_width_bins():
    y = np.array([0, 1])
    probs = np.array([[0.54, 0.46], [0.58, 0.42]])  # both in (8/15, 9/15]: one bin with fifteen
    assert expected_calibration_error(y, probs) == pytest.approx(abs(1 - 1.12) / 2)


def test_one_sample_is_evaluated_and_none_is_refused_by_name():
    m = classification_metrics([1], np.array([[0.3, 0.7]]), ["a", "b"], bootstrap=10)
    assert m["accuracy"] == 1.0 and m["n"] == 1
    with pytest.raises(ValueError, match="^no samples to evaluate$"):
        classification_metrics([], np.zeros((0, 2)), ["a", "b"])


def test_a_label_equal_to_the_class_count_is_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got \[0, 2\]"):
        classification_metrics([0, 2], np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([-1, 0], np.ones((2, 2)) / 2, ["a", "b"])


def test_auc_is_defined_for_a_class_with_a_single_positive():
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    assert roc_auc_one_vs_rest(y, probs) == [pytest.approx(1.0), pytest.approx(1.0)]
