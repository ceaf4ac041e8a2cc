"""Aggregates, data-efficiency rows and paired comparisons from a hand-written schema-2 bundle."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from hdkd.evidence.aggregate import (
    aggregate,
    data_efficiency_rows,
    did_not_learn,
    not_learned,
    paired_sentences,
    runs_at,
    seeds_not_learned,
    sentence,
    significance_rows,
)

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
                            "f1_macro_std", "n_seeds", "seeds_did_not_learn", "did_not_learn"}
    assert (rows[3]["seeds_did_not_learn"], rows[3]["did_not_learn"]) == (0, False)
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
    assert set(rows[0]) == {"family", "claim", "comparison", "fraction", "minus_fraction", "metric",
                            "difference_mean", "ci_low", "ci_high", "p_value", "test", "effect_size", "p_value_holm",
                            "n_seeds", "did_not_learn"}
    assert {r["family"] for r in rows} == {"exploratory"} and {r["minus_fraction"] for r in rows} == {None}
    assert rows[0]["comparison"] == "hdkd vs student"
    assert (t_acc["n_seeds"], t_acc["did_not_learn"], rows[0]["n_seeds"]) == (3, [], 1)
    # differences 0.2, 0.1, -0.1: mean 1/15 over their sample std
    assert t_acc["effect_size"] == pytest.approx((1 / 15) / np.std([0.2, 0.1, -0.1], ddof=1))


def test_holm_family_is_every_paired_t_row_with_a_p_value():
    rows = significance_rows(_bundle(), [("hdkd", "student"), ("student", "hdkd")])
    family = [r for r in rows if r["test"] == "paired_t" and r["p_value"] is not None]
    assert len(family) == 4  # two metrics at fraction 1 in each order; fraction 0.5 has one seed: no test
    expected = multipletests([r["p_value"] for r in family], method="holm")[1]
    assert [r["p_value_holm"] for r in family] == pytest.approx(list(expected))
    assert all(r["p_value_holm"] > r["p_value"] for r in family)
    assert all(r["p_value_holm"] is None for r in rows if r not in family)  # McNemar rows, untested rows


def _one_class(bundle, model, seeds, fraction=1.0, label=0):
    """``bundle`` with ``model``'s runs at ``seeds`` answering ``label`` for every test image."""
    for run in bundle["models"][model]["runs"]:
        if run["seed"] in seeds and run["fraction"] == fraction:
            run["predictions"] = [label] * len(bundle["test_labels"])
    return bundle


def test_a_run_that_answers_one_class_did_not_learn():
    labels = LABELS * 10  # 40 % class 0
    assert did_not_learn({"predictions": [0] * 100}, labels)
    assert did_not_learn({"predictions": [0] * 95 + [1] * 5}, labels)  # 95 %: the threshold
    assert not did_not_learn({"predictions": [0] * 94 + [1] * 6}, labels)
    assert not did_not_learn({"predictions": labels}, labels)
    # a test set that lopsided: a model that learned it answers as often one class, and is not flagged
    lopsided = [0] * 97 + [1] * 3
    assert not did_not_learn({"predictions": lopsided}, lopsided)
    assert did_not_learn({"predictions": [0] * 100}, lopsided)


def test_a_model_did_not_learn_when_most_of_its_seeds_did_not():
    one = _one_class(_bundle(), "hdkd", {0})
    assert seeds_not_learned(one, "hdkd") == (1, 3) and not not_learned(one, "hdkd")
    two = _one_class(_bundle(), "hdkd", {0, 2})
    assert seeds_not_learned(two, "hdkd") == (2, 3) and not_learned(two, "hdkd")
    assert not not_learned(two, "hdkd", 0.5) and not not_learned(two, "student")
    rows = {(r["fraction"], r["model"]): r for r in data_efficiency_rows(two, ["hdkd", "student"])}
    assert (rows[1.0, "hdkd"]["seeds_did_not_learn"], rows[1.0, "hdkd"]["did_not_learn"]) == (2, True)
    assert not rows[0.5, "hdkd"]["did_not_learn"]


def test_a_comparison_with_a_model_that_did_not_learn_gets_no_verdict():
    bundle = _one_class(_bundle(), "student", {0, 1, 2})
    rows = significance_rows(bundle, [("hdkd", "student")])
    assert {tuple(r["did_not_learn"]) for r in rows if r["fraction"] == 1.0} == {("student",)}
    assert {tuple(r["did_not_learn"]) for r in rows if r["fraction"] == 0.5} == {()}
    said = paired_sentences(rows, "hdkd", "student", ("HDKD", "Student"), ("accuracy",))
    assert len(said) == 1 and said[0].startswith("HDKD vs Student: ")
    assert "no verdict: Student did not learn" in said[0]
    assert "significant" not in said[0] and "p = " not in said[0]
    learned = paired_sentences(significance_rows(_bundle(), [("hdkd", "student")]), "hdkd", "student",
                               ("HDKD", "Student"), ("accuracy",))
    assert "did not learn" not in learned[0] and "significant at 0.05" in learned[0]


def test_comparison_of_an_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="'baseline' is not in the results bundle"):
        significance_rows(_bundle(), [("hdkd", "baseline")])


def test_runs_at_selects_by_fraction():
    assert sorted(runs_at(_bundle(), "student", 1.0)) == [0, 1, 2]


def test_sentence_reads_plainly():
    row = {"metric": "accuracy", "difference_mean": 0.0123, "ci_low": -0.004, "ci_high": 0.0286,
           "p_value": 0.0212, "p_value_holm": 0.0712, "test": "paired_t", "n_seeds": 3}
    assert sentence(row, "HDKD", "Student") == (
        "HDKD vs Student: +1.2 points accuracy [-0.4, +2.9], p = 0.0212 (Holm-adjusted 0.0712): not significant "
        "at 0.05 (paired t over 3 seeds).")  # the verdict is the adjusted p's
    sig = sentence({**row, "p_value_holm": 0.04}, "HDKD", "Student")
    assert sig.endswith("significant at 0.05 (paired t over 3 seeds).") and "not significant" not in sig
    one_seed = {**row, "ci_low": None, "ci_high": None, "p_value": None, "p_value_holm": None, "n_seeds": 1}
    assert sentence(one_seed, "HDKD", "Student").endswith("; no test (one seed).")
    constant = {**row, "ci_low": 0.0123, "ci_high": 0.0123, "p_value": None, "p_value_holm": None}
    assert sentence(constant, "HDKD", "Student").endswith("; no test (the same at every seed).")
    assert sentence(row, "HDKD", "Student", ["HDKD"]) == (
        "HDKD vs Student: +1.2 points accuracy; no verdict: HDKD did not learn (at most of the 3 seeds, at least "
        "95 % of the test predictions are one class).")


# ----------------------------------------------------------------------------------- pre-registered claims
CHOSEN = {  # accuracies per seed 0, 1, 2 (chosen numbers)
    ("student", 0.1): [0.60, 0.62, 0.61], ("hdkd", 0.1): [0.66, 0.67, 0.69],
    ("student", 1.0): [0.80, 0.81, 0.79], ("hdkd", 1.0): [0.82, 0.83, 0.83],
    ("teacher", 1.0): [0.85, 0.84, 0.86], ("teacher", 0.1): [0.70, 0.70, 0.71],
}


def _claims_bundle():
    return {"test_labels": LABELS, "models": {
        m: {"runs": [_run(s, f, acc[s], acc[s] - 0.1, list(LABELS)) for (model, f), acc in CHOSEN.items()
                     if model == m for s in range(3)]} for m in ("teacher", "student", "hdkd")}}


def _claim(text, a, b, fraction, minus=None):
    return {"claim": text, "compare": [a, b], "fraction": fraction, "minus_fraction": minus, "metric": "accuracy"}


CLAIMS = [_claim("HDKD beats the student on a tenth", "hdkd", "student", 0.1),
          _claim("HDKD beats the student on all", "hdkd", "student", 1.0),
          _claim("HDKD beats the teacher", "hdkd", "teacher", 1.0),
          _claim("HDKD gains more on a tenth", "hdkd", "student", 0.1, 1.0)]


def test_the_primary_familys_holm_adjustment_on_a_hand_computed_case():
    rows = significance_rows(_claims_bundle(), [("hdkd", "student"), ("hdkd", "teacher")], CLAIMS)
    primary = [r for r in rows if r["family"] == "primary"]
    assert [r["claim"] for r in primary] == [c["claim"] for c in CLAIMS]
    # each claim's p: the paired t over the seeds (scipy)
    def diffs(a, b, f):
        return np.subtract(CHOSEN[a, f], CHOSEN[b, f])

    raw = [sps.ttest_rel(CHOSEN["hdkd", 0.1], CHOSEN["student", 0.1]).pvalue,
           sps.ttest_rel(CHOSEN["hdkd", 1.0], CHOSEN["student", 1.0]).pvalue,
           sps.ttest_rel(CHOSEN["hdkd", 1.0], CHOSEN["teacher", 1.0]).pvalue,
           # the difference of paired differences: (+.06, +.05, +.08) - (+.02, +.02, +.04) = (+.04, +.03, +.04)
           sps.ttest_1samp(diffs("hdkd", "student", 0.1) - diffs("hdkd", "student", 1.0), 0).pvalue]
    assert [r["p_value"] for r in primary] == pytest.approx(raw)
    assert primary[3]["difference_mean"] == pytest.approx(0.11 / 3)
    assert (primary[3]["test"], primary[3]["fraction"], primary[3]["minus_fraction"]) == (
        "paired_t_of_differences", 0.1, 1.0)
    # Holm by hand over these four alone: sort, multiply the k-th smallest by (4 - k + 1), carry the running max
    order = np.argsort(raw)
    adjusted, running = [0.0] * 4, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (4 - k) * raw[i]))
        adjusted[i] = running
    assert [r["p_value_holm"] for r in primary] == pytest.approx(adjusted)
    assert adjusted == pytest.approx(list(multipletests(raw, method="holm")[1]))
    # exploratory: every other paired t row, adjusted on its own; the claimed tests are not repeated there
    exploratory = [r for r in rows if r["family"] == "exploratory" and r["test"] == "paired_t"]
    assert not [r for r in exploratory if (r["comparison"], r["fraction"], r["metric"]) in {
        ("hdkd vs student", 0.1, "accuracy"), ("hdkd vs student", 1.0, "accuracy"), ("hdkd vs teacher", 1.0, "accuracy")}]
    tested = [r for r in exploratory if r["p_value"] is not None]
    assert [r["p_value_holm"] for r in tested] == pytest.approx(
        list(multipletests([r["p_value"] for r in tested], method="holm")[1]))
    assert len(tested) == 5  # f1 at 0.1 and 1 (hdkd vs student), accuracy and f1 at 0.1, f1 at 1 (vs the teacher)


def test_a_claims_verdict_and_the_seeds_it_needs():
    from hdkd.evidence.aggregate import claim_verdict, claims_power
    from hdkd.evidence.stats import minimum_detectable_effect, seeds_needed

    rows = significance_rows(_claims_bundle(), [], CLAIMS)
    verdicts = [claim_verdict(r) for r in rows]
    p = [r["p_value_holm"] for r in rows]
    assert verdicts[2] == ("contradicted" if p[2] < 0.05 else "not supported")  # HDKD is below its teacher
    assert verdicts[0] == ("supported" if p[0] < 0.05 else "not supported")
    row = dict(rows[0])
    assert claim_verdict({**row, "p_value_holm": 0.01, "difference_mean": 0.02}) == "supported"
    assert claim_verdict({**row, "p_value_holm": 0.01, "difference_mean": -0.02}) == "contradicted"
    assert claim_verdict({**row, "p_value_holm": 0.2}) == "not supported"
    assert claim_verdict({**row, "p_value_holm": None}) == "not supported"
    assert claim_verdict({**row, "did_not_learn": ["student"]}) == "no verdict"
    # seeds: at alpha / 4 (four tested claims), from each claim's sample std of the per-seed differences
    power = claims_power(rows)
    sd = float(np.std([0.06, 0.05, 0.08], ddof=1))
    assert rows[0]["difference_sd"] == pytest.approx(sd)
    assert power[0] == {"seeds_needed": seeds_needed(0.015, sd, 0.05 / 4),
                        "mde": pytest.approx(minimum_detectable_effect(sd, 3, 0.05 / 4)), "alpha": 0.0125}
