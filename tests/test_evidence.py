"""Aggregates, data-efficiency rows and paired comparisons from a hand-written schema-2 bundle."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from hdkd.evidence import aggregate, data_efficiency_rows, runs_at, sentence, significance_rows

LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def _run(seed, fraction, acc, f1, predictions):
    return {"seed": seed, "fraction": fraction, "evaluation": {"accuracy": acc, "f1_macro": f1},
            "predictions": predictions, "history": []}


def _bundle():
    right = list(LABELS)
    wrong_two = [1, 2] + LABELS[2:]  # errs on images 0 and 1
    wrong_one = [1] + LABELS[1:]  # errs on image 0
    return {
        "test_labels": LABELS,
        "models": {
            "hdkd": {"runs": [_run(0, 1.0, 1.0, 0.9, right), _run(1, 1.0, 0.9, 0.8, wrong_one),
                              _run(2, 1.0, 0.8, 0.7, wrong_two), _run(0, 0.5, 0.7, 0.6, wrong_two)]},
            "student": {"runs": [_run(0, 1.0, 0.8, 0.7, wrong_two), _run(1, 1.0, 0.8, 0.75, wrong_two),
                                 _run(2, 1.0, 0.9, 0.6, wrong_one), _run(0, 0.5, 0.6, 0.5, wrong_two)]},
        },
    }


def test_aggregate_is_mean_and_sample_std_over_seeds():
    agg = aggregate(_bundle(), "hdkd")
    assert agg["accuracy_mean"] == pytest.approx(0.9)
    assert agg["accuracy_std"] == pytest.approx(0.1)
    assert agg["f1_macro_mean"] == pytest.approx(0.8)
    assert agg["n_seeds"] == 3
    one = aggregate(_bundle(), "hdkd", 0.5)
    assert (one["accuracy_mean"], one["accuracy_std"], one["n_seeds"]) == (0.7, None, 1)
    with pytest.raises(ValueError, match="no run at training fraction 0.25"):
        aggregate(_bundle(), "hdkd", 0.25)


def test_data_efficiency_rows_follow_the_contract():
    rows = data_efficiency_rows(_bundle(), ["hdkd", "student"])
    assert [(r["fraction"], r["model"]) for r in rows] == [(0.5, "hdkd"), (0.5, "student"),
                                                          (1.0, "hdkd"), (1.0, "student")]
    assert set(rows[0]) == {"fraction", "model", "accuracy_mean", "accuracy_std", "f1_macro_mean",
                            "f1_macro_std", "n_seeds"}
    assert rows[3]["accuracy_mean"] == pytest.approx(np.mean([0.8, 0.8, 0.9]))


def test_significance_pairs_by_seed_and_matches_scipy():
    rows = significance_rows(_bundle(), [("hdkd", "student")])
    full = [r for r in rows if r["fraction"] == 1.0]
    t_acc = next(r for r in full if r["test"] == "paired_t" and r["metric"] == "accuracy")
    ref = sps.ttest_rel([1.0, 0.9, 0.8], [0.8, 0.8, 0.9])
    assert t_acc["difference_mean"] == pytest.approx(1 / 15)  # (0.2 + 0.1 - 0.1) / 3
    assert t_acc["p_value"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval()
    assert (t_acc["ci_low"], t_acc["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    mcn = {r["test"]: r for r in full if r["test"].startswith("mcnemar")}
    assert set(mcn) == {"mcnemar_exact_seed0", "mcnemar_exact_seed1", "mcnemar_exact_seed2"}
    # seed 0: hdkd right on all, student wrong on 2 -> n10 = 2, n01 = 0: p = 2 * 0.5^2
    assert mcn["mcnemar_exact_seed0"]["difference_mean"] == pytest.approx(0.2)
    assert mcn["mcnemar_exact_seed0"]["p_value"] == pytest.approx(0.5)
    # one seed at fraction 0.5: no t-test, McNemar still per seed
    half = [r for r in rows if r["fraction"] == 0.5]
    assert next(r for r in half if r["test"] == "paired_t")["p_value"] is None
    assert {r["test"] for r in half} == {"paired_t", "mcnemar_exact_seed0"}
    assert set(rows[0]) == {"comparison", "fraction", "metric", "difference_mean", "ci_low", "ci_high",
                            "p_value", "test"}
    assert rows[0]["comparison"] == "hdkd vs student"


def test_comparison_of_an_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="'baseline' is not in the results bundle"):
        significance_rows(_bundle(), [("hdkd", "baseline")])


def test_runs_at_selects_by_fraction():
    assert sorted(runs_at(_bundle(), "student", 1.0)) == [0, 1, 2]


def test_sentence_reads_plainly():
    row = {"metric": "accuracy", "difference_mean": 0.0123, "ci_low": -0.004, "ci_high": 0.0286,
           "p_value": 0.0712, "test": "paired_t"}
    assert sentence(row, "HDKD", "Student", 3) == (
        "HDKD vs Student: +1.2 points accuracy [-0.4, +2.9], p = 0.0712: not significant at 0.05 "
        "(paired t over 3 seeds).")
    sig = sentence({**row, "p_value": 0.01}, "HDKD", "Student", 3)
    assert sig.endswith("significant at 0.05 (paired t over 3 seeds).") and "not significant" not in sig
    one_seed = {**row, "ci_low": None, "ci_high": None, "p_value": None}  # what paired_t gives for one seed
    assert sentence(one_seed, "HDKD", "Student", 1).endswith("; no test (one seed).")
    constant = {**row, "ci_low": 0.0123, "ci_high": 0.0123, "p_value": None}  # the same difference at every seed
    assert sentence(constant, "HDKD", "Student", 3).endswith("; no test (the same at every seed).")
