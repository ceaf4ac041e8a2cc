"""The evidence across seeds as its docstrings promise it (hdkd/evidence/aggregate.py): runs picked by fraction
and seed, the "did not learn" rule at its boundaries, only common seeds paired, the errors that name what is
missing, an ablation's effect against a reference bundle, the pre-registered claims' rows, verdicts and seed
counts, and the plain sentences the report prints."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from hdkd.evidence.aggregate import (
    aggregate,
    claim_row,
    claim_verdict,
    claims_power,
    compare,
    data_efficiency_rows,
    did_not_learn,
    fractions_of,
    not_learned,
    paired_sentences,
    runs_at,
    seeds_not_learned,
    seeds_of,
    sentence,
    significance_rows,
    versus_reference,
)
from hdkd.evidence.stats import minimum_detectable_effect, seeds_needed

LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def _run(seed, fraction, acc, f1=None, predictions=None):
    return {"seed": seed, "fraction": fraction, "evaluation": {"accuracy": acc, "f1_macro": acc - 0.1 if f1 is None
                                                               else f1},
            "predictions": list(LABELS) if predictions is None else predictions}


def _bundle(models, labels=LABELS):
    return {"test_labels": list(labels), "models": {m: {"runs": runs} for m, runs in models.items()}}


def _wrong(*images):
    """Predictions wrong on ``images`` only."""
    return [(y + 1) % 3 if i in images else y for i, y in enumerate(LABELS)]


# ------------------------------------------------------------------------------------------------ the runs
def test_runs_are_picked_by_fraction_whatever_its_spelling_and_keyed_by_seed():
    b = _bundle({"a": [_run("2", 1, 0.8), _run(0, 1.0, 0.7), _run(1, 0.5, 0.6)], "b": [_run(5, 0.25, 0.5)]})
    assert sorted(runs_at(b, "a", 1.0)) == [0, 2] and runs_at(b, "a", 1)[2]["evaluation"]["accuracy"] == 0.8
    assert list(runs_at(b, "a", "0.5")) == [1] and runs_at(b, "a", 0.1) == {}
    assert fractions_of(b) == [0.25, 0.5, 1.0]  # every model's, each once, ascending
    assert seeds_of(b) == [0, 1, 2, 5]


def test_aggregate_of_chosen_metrics_and_the_missing_fraction_named():
    b = _bundle({"a": [_run(2, 1.0, 0.9, 0.5), _run(0, 1.0, 0.7, 0.3), _run(1, 1.0, 0.8, 0.4)]})
    assert aggregate(b, "a", metrics=["f1_macro"]) == {"f1_macro_mean": pytest.approx(0.4),
                                                       "f1_macro_std": pytest.approx(0.1), "n_seeds": 3}
    with pytest.raises(ValueError, match=r"^results bundle: model 'a' has no run at training fraction 0\.5$"):
        aggregate(b, "a", 0.5)


def test_data_efficiency_rows_keep_the_models_order_and_skip_a_fraction_a_model_did_not_run():
    b = _bundle({"z": [_run(0, 1.0, 0.9), _run(0, 0.5, 0.6)], "a": [_run(0, 1.0, 0.7)]})
    rows = data_efficiency_rows(b, ["z", "a"])
    assert [(r["fraction"], r["model"]) for r in rows] == [(0.5, "z"), (1.0, "z"), (1.0, "a")]
    assert rows[2]["accuracy_mean"] == 0.7 and rows[2]["accuracy_std"] is None
    assert (rows[0]["accuracy_mean"], rows[1]["accuracy_mean"]) == (0.6, 0.9)  # each row at its own fraction
    one_class = _bundle({"z": [_run(0, 1.0, 0.9), _run(0, 0.5, 0.4, predictions=[0] * len(LABELS))]})
    assert [(r["seeds_did_not_learn"], r["did_not_learn"]) for r in data_efficiency_rows(one_class, ["z"])] == [
        (1, True), (0, False)]


# -------------------------------------------------------------------------------------------- did not learn
def test_a_run_on_one_class_as_often_as_the_test_labels_are_is_not_flagged():
    labels = [0] * 95 + [1] * 5
    assert not did_not_learn({"predictions": [0] * 95 + [1] * 5}, labels)  # 95 % = the labels' share: not more
    assert did_not_learn({"predictions": [0] * 96 + [1] * 4}, labels)
    # the top class is the most predicted one, not class 0
    assert did_not_learn({"predictions": [2] * 97 + [0] * 3}, [0, 1, 2] * 33 + [0])
    # and a model's seeds are judged against the bundle's test labels
    lopsided = _bundle({"m": [_run(0, 1.0, 0.9, predictions=[0] * 95 + [1] * 5)]}, labels=labels)
    assert seeds_not_learned(lopsided, "m") == (0, 1)


def test_a_model_did_not_learn_only_when_a_strict_majority_of_its_seeds_did_not():
    one_class = [0] * len(LABELS)
    half = _bundle({"m": [_run(s, 1.0, 0.4, predictions=one_class if s < 2 else None) for s in range(4)]})
    assert seeds_not_learned(half, "m") == (2, 4) and not not_learned(half, "m")
    most = _bundle({"m": [_run(s, 1.0, 0.4, predictions=one_class if s < 3 else None) for s in range(4)]})
    assert seeds_not_learned(most, "m") == (3, 4) and not_learned(most, "m")
    assert data_efficiency_rows(most, ["m"])[0]["seeds_did_not_learn"] == 3


# ------------------------------------------------------------------------------------------- comparisons
def test_a_comparison_pairs_only_the_seeds_both_models_ran():
    b = _bundle({"a": [_run(0, 1.0, 0.9, predictions=_wrong(0)), _run(1, 1.0, 0.8, predictions=_wrong(0, 1)),
                       _run(2, 1.0, 0.9), _run(7, 1.0, 0.1)],
                 "b": [_run(0, 1.0, 0.7, predictions=_wrong(0, 1, 2)), _run(1, 1.0, 0.7, predictions=_wrong(2, 3, 4)),
                       _run(2, 1.0, 0.6, predictions=_wrong(1, 2, 3, 4)), _run(9, 1.0, 1.0)]})
    rows = compare(b, "a", "b", 1.0)
    assert [(r["metric"], r["test"]) for r in rows] == [
        ("accuracy", "paired_t"), ("f1_macro", "paired_t"), ("accuracy", "mcnemar_exact_seed0"),
        ("accuracy", "mcnemar_exact_seed1"), ("accuracy", "mcnemar_exact_seed2")]
    assert {r["n_seeds"] for r in rows} == {3} and {r["comparison"] for r in rows} == {"a vs b"}
    ref = sps.ttest_rel([0.9, 0.8, 0.9], [0.7, 0.7, 0.6])  # seeds 7 and 9 are not paired
    assert rows[0]["p_value"] == pytest.approx(ref.pvalue) and rows[0]["difference_mean"] == pytest.approx(0.2)
    # seed 1: a errs on images 0, 1; b on 2, 3, 4: n10 = 3, n01 = 2 -> (3 - 2) / 10
    assert rows[3]["difference_mean"] == pytest.approx(0.1)
    # the level reaches both tests: narrower intervals at 80 %
    narrow = compare(b, "a", "b", 1.0, level=0.8)
    assert all(n["ci_high"] - n["ci_low"] < w["ci_high"] - w["ci_low"] for n, w in zip(narrow, rows))
    with pytest.raises(ValueError, match=r"^comparison a vs b: no seed in common at training fraction 0\.5$"):
        compare(_bundle({"a": [_run(0, 0.5, 0.9)], "b": [_run(1, 0.5, 0.8)]}), "a", "b", 0.5)


def test_an_ablations_effect_is_paired_by_seed_against_the_reference_bundle():
    run = _bundle({"hdkd": [_run(0, 1.0, 0.85), _run(1, 1.0, 0.80), _run(2, 1.0, 0.90), _run(0, 0.5, 0.1)]})
    reference = _bundle({"hdkd": [_run(0, 1.0, 0.80), _run(1, 1.0, 0.78), _run(2, 1.0, 0.84), _run(3, 1.0, 0.0)]})
    effect = versus_reference(run, reference, "hdkd")
    ref = sps.ttest_rel([0.85, 0.80, 0.90], [0.80, 0.78, 0.84])
    assert effect.difference_mean == pytest.approx(0.13 / 3) and effect.p_value == pytest.approx(ref.pvalue)
    f1 = versus_reference(run, reference, "hdkd", "f1_macro", level=0.8)
    assert f1.difference_mean == pytest.approx(0.13 / 3) and f1.ci_high - f1.ci_low < effect.ci_high - effect.ci_low
    other_images = {**reference, "test_labels": [1] + LABELS[1:]}
    assert versus_reference(run, other_images, "hdkd") is None
    no_common = _bundle({"hdkd": [_run(5, 1.0, 0.8)]})
    assert versus_reference(run, no_common, "hdkd") is None


# ------------------------------------------------------------------------------------------------- claims
ACC = {("s", 0.1): [0.60, 0.62, 0.61, 0.5], ("h", 0.1): [0.66, 0.67, 0.69],
       ("s", 1.0): [0.80, 0.81, 0.79], ("h", 1.0): [0.82, 0.83, 0.83]}


def _claims_bundle(acc=ACC):
    models = {}
    for (m, f), values in acc.items():
        models.setdefault(m, []).extend(_run(s, f, a) for s, a in enumerate(values))
    return _bundle(models)


def _claim(a, b, fraction, minus=None, metric="accuracy", text="claim"):
    return {"claim": text, "compare": [a, b], "fraction": fraction, "minus_fraction": minus, "metric": metric}


def test_a_claim_row_is_the_paired_t_of_its_pair_over_the_common_seeds():
    row = claim_row(_claims_bundle(), _claim("h", "s", 0.1))  # s's seed 3 has no h run: not paired
    ref = sps.ttest_rel(ACC["h", 0.1], ACC["s", 0.1][:3])
    assert (row["family"], row["claim"], row["comparison"], row["fraction"], row["minus_fraction"]) == (
        "primary", "claim", "h vs s", 0.1, None)
    assert (row["test"], row["n_seeds"], row["metric"], row["did_not_learn"]) == ("paired_t", 3, "accuracy", [])
    assert row["p_value"] == pytest.approx(ref.pvalue) and row["difference_mean"] == pytest.approx(0.19 / 3)
    assert row["difference_sd"] == pytest.approx(np.std([0.06, 0.05, 0.08], ddof=1))


def test_a_gain_claim_differences_the_two_fractions_paired_differences():
    row = claim_row(_claims_bundle(), _claim("h", "s", 0.1, 1.0))
    gains = np.subtract([0.06, 0.05, 0.08], [0.02, 0.02, 0.04])
    assert (row["test"], row["fraction"], row["minus_fraction"]) == ("paired_t_of_differences", 0.1, 1.0)
    assert row["p_value"] == pytest.approx(sps.ttest_1samp(gains, 0).pvalue)
    assert row["difference_sd"] == pytest.approx(np.std(gains, ddof=1))
    assert row["effect_size"] == pytest.approx(gains.mean() / np.std(gains, ddof=1))
    ci = sps.ttest_1samp(gains, 0).confidence_interval()
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))


@pytest.mark.parametrize("minus", [None, 1.0])
def test_a_claims_interval_follows_the_level(minus):
    wide, narrow = (claim_row(_claims_bundle(), _claim("h", "s", 0.1, minus), level) for level in (0.95, 0.8))
    assert wide["ci_low"] < narrow["ci_low"] < narrow["difference_mean"] < narrow["ci_high"] < wide["ci_high"]
    rows = {level: significance_rows(_claims_bundle(), [("h", "s")], [_claim("h", "s", 0.1, minus)], level)
            for level in (0.95, 0.8)}
    t_rows = [(n, w) for n, w in zip(rows[0.8], rows[0.95]) if not n["test"].startswith("mcnemar")]
    # the claim, then the exploratory t rows (the one the claim tests left out; a gain claim replaces none)
    assert [n["family"] for n, _ in t_rows] == ["primary"] + ["exploratory"] * (3 if minus is None else 4)
    assert all(n["ci_high"] - n["ci_low"] < w["ci_high"] - w["ci_low"] for n, w in t_rows)


def test_paired_by_seed_is_a_95_percent_interval_by_default():
    from hdkd.evidence.aggregate import paired_by_seed

    b = _claims_bundle()
    c = paired_by_seed(runs_at(b, "h", 1.0), runs_at(b, "s", 1.0), "accuracy")
    ci = sps.ttest_rel(ACC["h", 1.0], ACC["s", 1.0]).confidence_interval(confidence_level=0.95)
    assert (c.ci_low, c.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_a_claim_names_a_model_that_did_not_learn_at_either_fraction():
    b = _claims_bundle()
    for run in b["models"]["s"]["runs"]:
        if run["fraction"] == 1.0:
            run["predictions"] = [0] * len(LABELS)
    assert claim_row(b, _claim("h", "s", 0.1, 1.0))["did_not_learn"] == ["s"]
    assert claim_row(b, _claim("h", "s", 0.1))["did_not_learn"] == []


def test_a_claim_without_its_runs_or_a_common_seed_is_an_error_naming_the_claim():
    with pytest.raises(ValueError, match=r"^claim 'x': no run of h at 0\.5, s at 0\.5 in the results bundle$"):
        claim_row(_claims_bundle(), _claim("h", "s", 0.5, text="x"))
    apart = _bundle({"h": [_run(1, 1.0, 0.9)], "s": [_run(0, 1.0, 0.8)]})
    with pytest.raises(ValueError, match=r"^claim 'y': no seed in common to h and s at \[1\.0\]$"):
        claim_row(apart, _claim("h", "s", 1.0, text="y"))


def test_a_claims_verdict_at_the_edge_of_alpha():
    row = {"did_not_learn": [], "p_value_holm": 0.05, "difference_mean": 0.02}
    assert claim_verdict(row) == "not supported"  # p = alpha is not below it
    assert claim_verdict({**row, "p_value_holm": 0.049}) == "supported"
    assert claim_verdict({**row, "p_value_holm": 0.02}, alpha=0.01) == "not supported"
    assert claim_verdict({**row, "p_value_holm": 0.001, "did_not_learn": ["h", "s"]}) == "no verdict"


def test_claims_power_sizes_each_primary_row_at_alpha_over_the_tested_claims():
    rows = [{"family": "primary", "p_value": 0.01, "difference_sd": 0.01, "n_seeds": 3},
            {"family": "primary", "p_value": None, "difference_sd": None, "n_seeds": 1},  # untested: not counted
            {"family": "exploratory", "p_value": 0.2, "difference_sd": 0.02, "n_seeds": 3},
            {"family": "primary", "p_value": 0.3, "difference_sd": 0.02, "n_seeds": 5}]
    power = claims_power(rows, difference=0.02, power=0.9, alpha=0.1)
    assert [p["alpha"] for p in power] == [0.05, 0.05, 0.05]  # 0.1 over two tested claims
    assert power[0] == {"seeds_needed": seeds_needed(0.02, 0.01, 0.05, 0.9),
                        "mde": pytest.approx(minimum_detectable_effect(0.01, 3, 0.05, 0.9)), "alpha": 0.05}
    assert power[1] == {"seeds_needed": None, "mde": None, "alpha": 0.05}
    assert power[2]["seeds_needed"] == seeds_needed(0.02, 0.02, 0.05, 0.9)
    assert claims_power(rows[1:3]) == [{"seeds_needed": None, "mde": None, "alpha": 0.05}]  # no tested claim: alpha
    assert claims_power(rows[2:3]) == []


def test_a_claim_replaces_only_the_exploratory_row_of_the_same_test():
    rows = significance_rows(_claims_bundle(), [("h", "s")], [_claim("h", "s", 1.0, metric="f1_macro"),
                                                             _claim("h", "s", 0.1, 1.0)])
    assert [(r["family"], r["test"]) for r in rows[:2]] == [("primary", "paired_t"),
                                                           ("primary", "paired_t_of_differences")]
    exploratory_t = [(r["fraction"], r["metric"]) for r in rows if r["family"] == "exploratory"
                     and r["test"] == "paired_t"]
    # the f1 claim at 1.0 is that row; the gain claim replaces none
    assert exploratory_t == [(0.1, "accuracy"), (0.1, "f1_macro"), (1.0, "accuracy")]
    assert all(r["claim"] is None and r["minus_fraction"] is None for r in rows[2:])
    assert all(r["p_value_holm"] is None for r in rows if r["test"].startswith("mcnemar"))
    columns = {"family", "claim", "comparison", "fraction", "minus_fraction", "metric", "n_seeds", "did_not_learn",
               "difference_mean", "ci_low", "ci_high", "p_value", "test", "effect_size", "p_value_holm"}
    assert set(rows[0]) == columns | {"difference_sd"} and set(rows[2]) == columns  # a claim's row: and its sd


def test_a_comparison_is_made_only_at_the_fractions_both_models_ran():
    b = _bundle({"a": [_run(0, 1.0, 0.9), _run(1, 1.0, 0.8), _run(0, 0.5, 0.7)], "b": [_run(0, 1.0, 0.7),
                                                                                      _run(1, 1.0, 0.7)]})
    assert {r["fraction"] for r in significance_rows(b, [("a", "b"), ("b", "a")])} == {1.0}


def test_a_single_tested_row_in_a_family_keeps_its_p():
    rows = significance_rows(_claims_bundle(), [], [_claim("h", "s", 1.0)])
    assert len(rows) == 1 and rows[0]["p_value_holm"] == pytest.approx(rows[0]["p_value"])


# ---------------------------------------------------------------------------------------------- sentences
def test_paired_sentences_only_for_the_pair_as_named_on_the_whole_training_split():
    rows = significance_rows(_claims_bundle(), [("h", "s"), ("s", "h")])
    said = paired_sentences(rows, "h", "s", ("HDKD", "Student"))
    assert [s.split(":")[0] for s in said] == ["HDKD vs Student", "HDKD vs Student"]
    assert "points accuracy" in said[0] and "points macro-F1" in said[1]
    ref = sps.ttest_rel(ACC["h", 1.0], ACC["s", 1.0])
    assert said[0].startswith(f"HDKD vs Student: +2.7 points accuracy [{100 * ref.confidence_interval().low:+.1f}, ")
    assert "(paired t over 3 seeds)" in said[0]
    assert paired_sentences(rows, "h", "s", ("HDKD", "Student"), ("f1_macro",)) == said[1:]
    assert paired_sentences(rows, "h", "t", ("HDKD", "Teacher")) == []


def test_a_sentence_on_macro_f1_a_negative_difference_and_both_models_that_did_not_learn():
    row = {"metric": "f1_macro", "difference_mean": -0.0349, "ci_low": -0.05, "ci_high": -0.0201,
           "p_value": 0.001234, "p_value_holm": 0.0049, "test": "paired_t", "n_seeds": 5}
    assert sentence(row, "A", "B") == ("A vs B: -3.5 points macro-F1 [-5.0, -2.0], p = 0.00123 (Holm-adjusted "
                                       "0.0049): significant at 0.05 (paired t over 5 seeds).")
    assert sentence(row, "A", "B", alpha=0.001).endswith("not significant at 0.001 (paired t over 5 seeds).")
    assert sentence(row, "A", "B", ["A", "B"]) == (
        "A vs B: -3.5 points macro-F1; no verdict: A and B did not learn (at most of the 5 seeds, at least 95 % of "
        "the test predictions are one class).")
