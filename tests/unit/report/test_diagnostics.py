"""The training diagnostics of the report: rows, the one-sentence diagnosis and the loss terms' figure, from
hand-made run histories whose values are known."""

from __future__ import annotations

import copy

import pytest

from hdkd.report.build import build_report
from hdkd.report.diagnostics import (
    diagnosis_sentence,
    diagnostics_rows,
    epochs_on_one_class,
    feature_to_ce_ratio,
    loss_terms_figure,
    loss_terms_rows,
)
from hdkd.report.tables import diagnostics_table
from tests.helpers.params import make_params


def row(epoch, majority_share, ce_grad=None, feature_grads=()):
    r = {"epoch": epoch, "val_pred_a": majority_share, "val_pred_b": 1 - majority_share, "val_pred_c": 0.0}
    if ce_grad is not None:
        r |= {"loss_ce": 0.5, "grad_norm_ce": ce_grad}
    for k, g in enumerate(feature_grads, 1):
        r |= {f"loss_feature_stage{k}": 10.0 * k, f"grad_norm_feature_stage{k}": g}
    return r


def with_histories(bundle):
    """``bundle`` whose HDKD runs collapse for 2 of 3 epochs at fraction 0.1 (feature / CE 100 then 10), and
    whose students collapse for 1 pass; other runs have no history (an older pipeline's)."""
    bundle = copy.deepcopy(bundle)
    for run in bundle["models"]["hdkd"]["runs"]:
        if run["fraction"] == 0.1:
            run["history"] = [row(1, 1.0, 0.5, (10, 20, 20)), row(2, 0.96, 1.0, (5, 5, 10)),
                              row(3, 0.7, 2.0, (5, 5, 10))]
    for run in bundle["models"]["student"]["runs"]:
        if run["fraction"] == 0.1:
            run["history"] = [row(1, 1.0, 0.5), row(2, 0.6, 0.5), row(3, 0.6, 0.5)]
    return bundle


def test_a_pass_is_on_one_class_from_its_largest_prediction_share():
    assert epochs_on_one_class([row(1, 1.0), row(2, 0.95), row(3, 0.949), row(4, 0.2)]) == 2
    assert feature_to_ce_ratio(row(1, 1.0, 0.5, (10, 20, 20))) == pytest.approx(100.0)
    assert feature_to_ce_ratio(row(1, 1.0, 0.5)) is None  # a model trained alone has no feature term
    assert feature_to_ce_ratio(row(1, 1.0)) is None  # an older history: no probes


def test_rows_and_the_sentence_say_how_long_hdkd_sat_on_one_class(bundle):
    b = with_histories(bundle)
    rows = {(r["model"], r["fraction"]): r for r in diagnostics_rows(b)}
    assert set(rows) == {("hdkd", 0.1), ("student", 0.1)}  # only the runs that carry a history
    hdkd = rows[("hdkd", 0.1)]
    assert hdkd["seeds"] == 3 and hdkd["epochs"] == 3 and hdkd["epochs_one_class"] == 2
    assert hdkd["ratio_first"] == pytest.approx(100.0) and hdkd["ratio_last"] == pytest.approx(10.0)
    assert rows[("student", 0.1)]["epochs_one_class"] == 1 and rows[("student", 0.1)]["ratio_first"] is None
    sentence = diagnosis_sentence(b)
    assert "send 100× the cross-entropy's gradient" in sentence and "(10× in its last)" in sentence
    assert "at 10 % of the data HDKD predicts one class on validation in 2.0 of its 3 epochs" in sentence
    assert "the student in 1.0 of 3" in sentence and "λ = 10" in sentence
    table = diagnostics_table(b)
    assert table.name == "training_diagnostics" and ("HDKD", "10", "3", "3.0", "2.0", "100.0", "10.0") in table.rows


def test_a_bundle_without_histories_has_no_diagnostics(bundle):
    assert diagnostics_rows(bundle) == [] and diagnosis_sentence(bundle) is None
    assert diagnostics_table(bundle) is None and loss_terms_figure(bundle) is None
    assert loss_terms_rows(bundle) == [("fraction", "epoch", "term", "loss", "grad_norm")]  # the header alone


def test_the_loss_terms_data_is_each_term_per_pass_mean_over_seeds(bundle):
    # The data of the figure's upper rows, which dvc.yaml's plots draw (figures/hdkd_loss_terms.csv).
    b = with_histories(bundle)
    b["models"]["hdkd"]["runs"][0]["history"][0]["grad_norm_ce"] = 2.0  # seed 0 of fraction 0.1: 2.0, the others 0.5
    header, *rows = loss_terms_rows(b)
    assert header == ("fraction", "epoch", "term", "loss", "grad_norm")
    assert [r[:3] for r in rows] == [("0.1", e, t) for t in ("ce", "feature_stage1", "feature_stage2",
                                                             "feature_stage3") for e in (1, 2, 3)]
    by_key = {(r[1], r[2]): r[3:] for r in rows}
    assert by_key[(1, "ce")] == pytest.approx((0.5, 1.0))  # (2.0 + 0.5 + 0.5) / 3 seeds
    assert by_key[(2, "feature_stage3")] == pytest.approx((30.0, 10.0))
    assert {r[2] for r in loss_terms_rows(b, "student")[1:]} == {"ce"}  # trained alone: its one term
    assert loss_terms_rows(b, "teacher") == [header]  # no run with a history


def test_the_report_draws_the_loss_terms_and_says_the_diagnosis(bundle, tmp_path):
    b = with_histories(bundle)
    fig = loss_terms_figure(b)
    axes = fig.get_axes()
    assert len(axes) == 3  # one fraction with histories: one column of three panels
    assert len(axes[0].get_lines()) == 4 and len(axes[1].get_lines()) == 4  # ce and three feature stages
    labels = {line.get_label() for line in axes[2].get_lines()}
    assert {"HDKD", "Student"} <= labels
    build_report(b, tmp_path, make_params().report)
    assert (tmp_path / "figures" / "hdkd_loss_terms.png").is_file()
    # its data, a DVC plot
    assert (tmp_path / "figures" / "hdkd_loss_terms.csv").read_text().splitlines()[:2] == [
        "fraction,epoch,term,loss,grad_norm", "0.1,1,ce,0.5,0.5"]
    assert (tmp_path / "tables" / "training_diagnostics.csv").is_file()
    readme = (tmp_path / "README.md").read_text()
    assert "## How the models trained" in readme and diagnosis_sentence(b) in readme
