"""Metrics against numbers counted by hand on small arrays."""


import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from hdkd.evaluation.metrics import (
    bootstrap_replicates,
    classification_metrics,
    expected_calibration_error,
    percentile_interval,
    roc_auc_one_vs_rest,
)


def one_hot_probs(pred, n_classes=3, top=0.6):
    """Probabilities whose argmax is ``pred``, every top-label confidence = ``top``."""
    probs = np.full((len(pred), n_classes), (1 - top) / (n_classes - 1))
    probs[np.arange(len(pred)), pred] = top
    return probs


# y_true 0 0 0 1 1 2 2 2, y_pred 0 0 1 1 1 2 2 0
#   confusion (rows actual): [2 1 0] [0 2 0] [1 0 2]
#   precision: 2/3, 2/3, 2/2   recall: 2/3, 2/2, 2/3   F1: 2/3, 4/5, 4/5
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 2, 2, 0])


def test_counts_precision_recall_f1_by_hand():
    m = classification_metrics(Y_TRUE, one_hot_probs(Y_PRED), ["a", "b", "c"], bootstrap=0)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    per_class = {c["class"]: c for c in m["per_class"]}
    assert [per_class[c]["precision"] for c in "abc"] == pytest.approx([2 / 3, 2 / 3, 1])
    assert [per_class[c]["recall"] for c in "abc"] == pytest.approx([2 / 3, 1, 2 / 3])
    assert [per_class[c]["f1"] for c in "abc"] == pytest.approx([2 / 3, 4 / 5, 4 / 5])
    assert [per_class[c]["support"] for c in "abc"] == [3, 2, 3]
    assert m["precision_macro"] == pytest.approx(7 / 9)
    assert m["recall_macro"] == pytest.approx(7 / 9)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 4 / 5 + 4 / 5) / 3)  # 34/45
    assert m["precision_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 2 / 3 + 3 * 1) / 8)  # 19/24
    assert m["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 4 / 5 + 3 * 4 / 5) / 8)  # 3/4
    assert m["balanced_accuracy"] == pytest.approx(7 / 9)
    # every confidence is 0.6 and 6 of 8 are right: one bin, |0.75 - 0.6|
    assert m["ece"] == pytest.approx(0.15)
    assert m["ci"] is None and m["classes_absent"] == []


def test_ece_four_samples_two_bins():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [0.4, 0.3, 0.3]])
    y = np.array([0, 1, 1, 2])  # right, wrong (conf .8), right (conf .6), wrong (conf .4)
    # bin (0.5, 1]: 3 samples, accuracy 2/3, mean confidence 2.3/3 -> 3/4 * 0.1
    # bin (0, 0.5]: 1 sample, accuracy 0, confidence 0.4       -> 1/4 * 0.4
    assert expected_calibration_error(y, probs, n_bins=2) == pytest.approx(0.075 + 0.1)


def test_ece_bins_are_closed_on_the_right():
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.1, 0.0]])
    y = np.array([0, 1])  # confidence exactly 0.5 (right) and 0.9 (wrong)
    # 0.5 belongs to (0, 0.5]: 1/2 * |1 - 0.5| + 1/2 * |0 - 0.9|; were it in (0.5, 1]: |0.5 - 0.7|
    assert expected_calibration_error(y, probs, n_bins=2) == pytest.approx(0.7)


def test_roc_auc_by_pair_counting_and_absent_class_policy():
    y = np.array([0, 0, 1, 1])  # class "c" never occurs
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1]])
    # class 0: positives score .8, .3 vs negatives .4, .2 -> 3 of 4 pairs ranked right
    # class 1: positives .5, .7 vs negatives .1, .6 -> 3 of 4
    assert roc_auc_one_vs_rest(y, probs) == [pytest.approx(0.75), pytest.approx(0.75), None]
    m = classification_metrics(y, probs, ["a", "b", "c"], bootstrap=0)
    assert m["roc_auc_macro"] == pytest.approx(0.75)  # over the defined classes
    assert m["per_class"][2]["roc_auc"] is None
    assert m["classes_absent"] == ["c"]
    # predictions 0 1 1 1: F1 a = 2/3 (P 1, R 1/2), b = 4/5 (P 2/3, R 1), c = 0 and still averaged
    assert m["f1_macro"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # sklearn: present classes only


def test_auc_is_none_when_only_one_class_occurs():
    m = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["a", "b"], bootstrap=0)
    assert m["roc_auc_macro"] is None


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([0, 5], np.ones((2, 2)) / 2, ["a", "b"])


def noisy_predictions(n=2000, n_classes=7, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, n_classes, n))
    return y, pred


def test_bootstrap_replicates_equal_sklearn_on_the_same_resamples():
    y, pred = noisy_predictions(n=300)
    reps = bootstrap_replicates(y, pred, 7, resamples=20, seed=3)
    idx = np.random.default_rng(3).integers(0, len(y), size=(20, len(y)))  # the documented draw
    for b in (0, 7, 19):
        t, p = y[idx[b]], pred[idx[b]]
        assert reps["accuracy"][b] == pytest.approx(accuracy_score(t, p))
        assert reps["f1_macro"][b] == pytest.approx(f1_score(t, p, labels=range(7), average="macro", zero_division=0))


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    y, pred = noisy_predictions()
    probs = one_hot_probs(pred, 7, top=0.5)
    a = classification_metrics(y, probs, list("abcdefg"), bootstrap=1000, seed=5)
    b = classification_metrics(y, probs, list("abcdefg"), bootstrap=1000, seed=5)
    c = classification_metrics(y, probs, list("abcdefg"), bootstrap=1000, seed=6)
    assert a["ci"] == b["ci"]
    assert a["ci"]["accuracy"] != c["ci"]["accuracy"]
    for key in ("accuracy", "f1_macro"):
        lo, hi = a["ci"][key]
        assert lo < a[key] < hi
        assert hi - lo < 0.06  # n = 2000: the interval is a few points wide, not degenerate or huge


def test_percentile_interval():
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx([5.0, 95.0])
