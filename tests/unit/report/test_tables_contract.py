"""What the report's tables print, cell by cell, on hand-made bundles: each number rounded once, the models named by
the run's own roster (a distillation method is named as its params name it), the ablation rows in the order of
their values, and a run that lacks a model or a column that only some ablations carry."""

import copy
import dataclasses

import pytest
import yaml

from hdkd.config import load_params
from hdkd.evidence.aggregate import significance_rows
from hdkd.evidence.bundle import load_bundle, make_bundle
from hdkd.evidence.stats import Comparison
from hdkd.infra.io import read_json
from hdkd.report.ablations import ABLATIONS
from hdkd.report.build import report_significance, report_tables
from hdkd.report.stage import study_report_config
from hdkd.report.tables import (
    Table,
    _points_ci,
    _sort_key,
    ablation_table,
    claim_comparison,
    claims_table,
    data_efficiency_table,
    efficiency_table,
    family_sizes,
    holm_tests,
    learned,
    main_table,
    metrics_table,
    param_value,
    pct,
    per_class_table,
    points_difference,
    seeds_sentence,
    significance_sentences,
    significance_table,
    table_csv,
    table_markdown,
)
from hdkd.roster import roster
from tests.helpers import ROOT
from tests.helpers.bundles import CLASSES, TEST_LABELS, bundle_with, hand_models
from tests.helpers.params import make_params

STUDY_KD = yaml.safe_load((ROOT / "params" / "study.yaml").read_text(encoding="utf-8"))["kd"]
BLOCK = next(a for a in ABLATIONS if a.name == "block")  # every paper model, with a MACs column
LAMBDA = next(a for a in ABLATIONS if a.name == "lambda")


def kd_bundle(overrides=None):
    """A bundle of a run with the study's distillation methods, logit-only KD among its models."""
    params = make_params({"kd": STUDY_KD, **(overrides or {})})
    models = hand_models()
    models["logit_kd"] = copy.deepcopy(models["hdkd"])
    return make_bundle(models, params, CLASSES, dataset="toy", test_labels=TEST_LABELS,
                       provenance={"git_commit": "0" * 40, "git_dirty": False})


def test_a_claim_names_its_models_by_the_runs_roster_and_its_metric_and_fractions_in_words():
    run = roster(kd_bundle()["params"])
    row = {"comparison": "hdkd vs logit_kd", "metric": "f1_macro", "fraction": 0.1, "minus_fraction": None}
    assert claim_comparison(row, run) == "HDKD − Logit-only KD, macro-F1, 10 % of the training data"
    gain = {**row, "comparison": "logit_kd vs student", "metric": "accuracy", "minus_fraction": 0.25}
    assert claim_comparison(gain, run) == ("(Logit-only KD − Student at 10 %) − (Logit-only KD − Student at 25 %) "
                                           "of the training data, accuracy, paired by seed")


def test_a_claims_difference_is_rounded_once_to_a_tenth_of_a_point_and_never_prints_minus_zero():
    row = {"difference_mean": 0.000496, "ci_low": -0.0004, "ci_high": 0.01249}
    # 0.0496 points: +0.0 (rounded twice, through 0.05, it would print +0.1)
    assert _points_ci(row) == "+0.0 [+0.0, +1.2]"
    assert _points_ci({"difference_mean": -0.0213, "ci_low": None, "ci_high": None}) == "-2.1 (one seed)"


def test_param_values_print_as_params_yaml_writes_them():
    assert [param_value(v) for v in (1e-05, 0.5, 10, "mbconv", [1, 2, 3])] == ["1e-05", "0.5", "10", "mbconv",
                                                                              "1, 2, 3"]


def test_ablation_values_sort_numbers_first_then_text_as_written_then_lists_by_length():
    values = [[1, 2], "mbconv", 3, [2], "mbcsa", 1, [1, 2, 3], 0.5]
    assert sorted(values, key=lambda v: _sort_key([v])) == [0.5, 1, 3, "mbconv", "mbcsa", [2], [1, 2], [1, 2, 3]]


def test_an_ablation_with_macs_shows_each_runs_own_and_a_run_lacking_a_model_gets_na_for_it_alone():
    reference = bundle_with()
    run = bundle_with({"model": {"block": "mbconv"}})
    run["models"]["hdkd"]["efficiency"]["macs"] = 1_234_500_000
    del run["models"]["student"]  # the run trained the teacher and HDKD only
    table = ablation_table(BLOCK, reference, [run])
    assert table.columns[:3] == ("Block", "Run (params hash)", "Reference")
    rows = {r[0]: dict(zip(table.columns, r)) for r in table.rows}
    assert rows["mbconv"]["HDKD MACs (M)"] == "1234.5"
    assert rows["mbcsa"]["HDKD MACs (M)"] == "2060.0"  # the reference's own
    assert all(rows["mbconv"][c] == "n/a" for c in table.columns if c.startswith("Student "))
    assert rows["mbconv"]["HDKD Accuracy (%)"] == "85.00" and rows["mbconv"]["Teacher Accuracy (%)"] == "90.00"
    assert len(table.columns) == 3 + 3 * 7 and all(len(r) == len(table.columns) for r in table.rows)
    assert "only in model.block;" in table.note


def test_an_ablation_without_macs_has_no_such_column_and_names_models_by_the_runs_roster():
    reference = kd_bundle()
    run = kd_bundle({"distill": {"lambda": 1}})
    table = ablation_table(LAMBDA, reference, [run])
    assert not any("MACs" in c for c in table.columns)
    assert "HDKD Accuracy (%)" in table.columns and len(table.columns) == 3 + 6
    tau = next(a for a in ABLATIONS if a.name == "alpha_tau")
    assert "only in distill.alpha, distill.tau;" in ablation_table(tau, reference, []).note
    wide = dataclasses.replace(LAMBDA, models=None)  # every model of the run, its kd methods too
    assert "Logit-only KD Accuracy (%)" in ablation_table(wide, reference, [run]).columns


# --- the tables of every report, on the hand bundle (tests.helpers.bundles: each number chosen, so each cell is known)


def rows_of(table):
    return {r[0]: dict(zip(table.columns, r)) for r in table.rows}


def test_the_main_table_prints_each_models_primary_run_and_its_spread_over_the_seeds():
    table = main_table(bundle_with())
    assert table.rows[0] == ("Teacher", "3.949", "5812.3", "90.00", "[85.00, 95.00]", "80.00", "70.00", "75.00",
                             "[70.00, 80.00]", "87.50 ± 2.50", "77.50 ± 2.50", "3", "yes")
    # the student errs on 8, 10, 12 of 40 test images over seeds 0-2: 80, 75, 70 %
    assert rows_of(table)["Student"]["Accuracy mean ± std (%)"] == "75.00 ± 5.00"
    assert [r[0] for r in table.rows] == ["Teacher", "Student", "HDKD"]
    assert "macro averages over all 3 classes" in table.note and "Test split of toy," in table.note
    assert "CI: percentile bootstrap over test images, 1000 resamples, seed 0." in table.note
    assert "HDKD: the student distilled from the teacher." in table.note


def without_bootstrap(bundle):
    for m in bundle["models"].values():
        m["evaluation"].pop("ci")
    return bundle


def test_without_bootstrap_or_efficiency_the_cells_say_na_and_the_note_says_why():
    bundle = without_bootstrap(bundle_with())
    del bundle["models"]["student"]["efficiency"]
    table = main_table(bundle)
    assert table.columns[4] == "Accuracy CI" and table.columns[8] == "F1 CI"
    student = rows_of(table)["Student"]
    assert (student["Params (M)"], student["MACs (M)"], student["Accuracy CI"]) == ("n/a", "n/a", "n/a")
    assert "No bootstrap confidence intervals (evaluate.bootstrap = 0)." in table.note
    assert [r[0] for r in efficiency_table(bundle).rows] == ["Teacher", "HDKD"]


def test_one_seed_prints_the_mean_alone():
    bundle = bundle_with()
    for m in bundle["models"].values():
        m["runs"] = [r for r in m["runs"] if r["seed"] == 0]
    student = rows_of(main_table(bundle))["Student"]
    assert (student["Accuracy mean ± std (%)"], student["Seeds"]) == ("80.00", "1")


def test_a_model_whose_runs_predict_one_class_is_marked_by_how_many_seeds():
    bundle = bundle_with()
    runs = [r for r in bundle["models"]["student"]["runs"] if r["fraction"] == 1.0]
    runs[0]["predictions"] = [2] * len(TEST_LABELS)  # every test image called the majority class (half of them)
    assert rows_of(main_table(bundle))["Student"]["Learned"] == "yes (1 of 3 seeds did not)"
    runs[1]["predictions"] = [2] * len(TEST_LABELS)
    assert rows_of(main_table(bundle))["Student"]["Learned"] == "no (2 of 3 seeds)"
    assert rows_of(main_table(bundle))["HDKD"]["Learned"] == "yes"


def test_the_metrics_per_class_and_efficiency_tables_print_what_the_bundle_holds():
    bundle = bundle_with()
    assert metrics_table(bundle).rows[1] == ("Student", "60.00", "70.00", "0.9000", "0.0625", "40")
    assert "ECE: top-label, 15 equal-width bins." in metrics_table(bundle).note
    per_class = per_class_table(bundle)
    assert per_class.columns[:5] == ("Class", "Support", "Teacher P (%)", "Teacher R (%)", "Teacher F1 (%)")
    assert per_class.rows[2] == ("nv", "20", "50.00", "25.00", "100.00", "50.00", "25.00", "87.50", "50.00", "25.00",
                                 "93.75")
    eff = efficiency_table(bundle)
    assert eff.columns == ("Model", "Params", "Trainable params", "MACs (M)", "CPU ms/img (bs 1)", "CPU img/s (bs 1)")
    assert eff.rows[2] == ("HDKD", "3727288", "3727288", "2060.0", "21.000", "47.6")
    export = {"models": {"hdkd": {"timing_cpu": {"1": {"batch_size": 1, "onnxruntime_ms_per_image": 12.5}}}}}
    with_onnx = efficiency_table(bundle, export)
    assert with_onnx.columns[-1] == "ONNX Runtime CPU ms/img (bs 1)"
    assert [r[-1] for r in with_onnx.rows] == ["n/a", "n/a", "12.500"] and "export.json" in with_onnx.note


def test_per_class_refuses_models_evaluated_on_other_test_sets():
    bundle = bundle_with()
    bundle["models"]["hdkd"]["evaluation"]["per_class"][0]["support"] = 11
    with pytest.raises(ValueError) as e:
        per_class_table(bundle)
    assert str(e.value) == "models of one bundle were evaluated on different test sets (per-class supports differ)"


def test_a_run_of_one_model_gets_its_tables():
    models = hand_models()
    bundle = make_bundle({"teacher": models["teacher"]}, make_params(), CLASSES, dataset="toy", test_labels=TEST_LABELS)
    assert metrics_table(bundle).rows == (("Teacher", "70.00", "80.00", "0.9000", "0.0625", "40"),)
    assert [r[:2] for r in per_class_table(bundle).rows] == [("akiec", "10"), ("bcc", "10"), ("nv", "20")]


def test_the_data_efficiency_table_has_every_model_at_every_fraction_over_the_seeds():
    table = data_efficiency_table(bundle_with())
    assert len(table.rows) == 4 * 3 and [r[0] for r in table.rows[::3]] == ["0.1", "0.25", "0.5", "1"]
    # the teacher at 10 %: errs on 14, 15, 16 of 40 images
    assert table.rows[0] == ("0.1", "teacher", "0.6250", "0.0250", "0.5250", "0.0250", "3", "0", "no")
    assert "train.budget: steps" in table.note
    bundle = bundle_with({"train": {"budget": "epochs"}})
    assert "train.budget: epochs" in data_efficiency_table(bundle).note


CLAIMS = [{"claim": "HDKD beats the student on a tenth", "compare": ["hdkd", "student"], "fraction": 0.1,
           "minus_fraction": None, "metric": "accuracy"},
          {"claim": "the gain is larger on a tenth", "compare": ["hdkd", "student"], "fraction": 0.1,
           "minus_fraction": 1.0, "metric": "f1_macro"}]


def test_the_significance_table_prints_each_row_with_its_family_and_the_sizes_of_both_families():
    rows = significance_rows(bundle_with(), [["hdkd", "student"]], CLAIMS)
    table = significance_table(rows)
    assert len(table.rows) == len(rows)
    # HDKD - student at 10 %: +5, +7.5, +10 points over seeds 0-2; t = 0.075 / (0.025 / sqrt 3), 2 df; Holm over 2
    assert table.rows[0] == ("primary", "hdkd vs student", "0.1", "n/a", "accuracy", "0.0750", "0.0129", "0.1371",
                             "3.000", "0.0351", "0.0702", "paired_t", "none")
    assert table.rows[1][:5] == ("primary", "hdkd vs student", "0.1", "1", "f1_macro")
    assert table.rows[1][11] == "paired_t_of_differences"
    mcnemar = next(r for r in table.rows if r[11] == "mcnemar_exact_seed0")
    assert mcnemar[0] == "exploratory" and mcnemar[8] == mcnemar[10] == "n/a"
    assert "the primary family holds 2 paired t-tests, the exploratory one 7 paired t-tests" in table.note
    assert "no claims were declared" not in table.note
    assert family_sizes(rows) == "the primary family holds 2 paired t-tests, the exploratory one 7 paired t-tests"
    assert significance_table([]) is None


def test_without_claims_there_is_one_family_and_no_claims_table():
    rows = significance_rows(bundle_with(), [["hdkd", "student"]])
    assert "no claims were declared for this run: one family of 8 paired t-tests" in significance_table(rows).note
    assert claims_table(bundle_with(), rows) is None and seeds_sentence(rows) == ""
    assert holm_tests([0.5]) == "1 paired t-test" and holm_tests([0.5, None, 0.2]) == "2 paired t-tests"


def test_the_claims_table_gives_each_claim_its_verdict_and_the_seeds_it_needs():
    bundle = bundle_with()
    rows = significance_rows(bundle, [["hdkd", "student"]], CLAIMS)
    table = claims_table(bundle, rows)
    assert table.rows[0] == ("HDKD beats the student on a tenth", "HDKD − Student, accuracy, 10 % of the training data",
                             "+7.5 [+1.3, +13.7]", "3.00", "0.0702", "not supported", "3", "29", "11.6")
    assert table.rows[1][1] == ("(HDKD − Student at 10 %) − (HDKD − Student at 100 %) of the training data, macro-F1, "
                                "paired by seed")
    assert "Holm-adjusted over the 2 paired t-tests of this family alone" in table.note
    assert "at α/m = 0.025" in table.note
    assert seeds_sentence(rows).startswith("Seeds: from this run's per-seed differences, detecting a 1.5-point "
                                           "difference with 80 % power in every claim at α/m = 0.025")
    # one claim with a detectable difference: the one value, no range
    assert seeds_sentence(rows).endswith("needs 29 seeds; this run used 3, so with them the smallest difference each "
                                         "claim detects at that power is 11.6 points.")


def test_the_seeds_sentence_gives_the_range_of_the_claims_detectable_differences():
    bundle = bundle_with()
    for r in bundle["models"]["hdkd"]["runs"]:  # seed 2's gain at full data twice the others': another spread
        if r["fraction"] == 1.0 and r["seed"] == 2:
            r["evaluation"]["accuracy"] += 0.05
    claims = CLAIMS + [{"claim": "HDKD beats the student on all", "compare": ["hdkd", "student"], "fraction": 1.0,
                        "minus_fraction": None, "metric": "accuracy"}]
    rows = significance_rows(bundle, [["hdkd", "student"]], claims)
    mdes = sorted(float(r[-1]) for r in claims_table(bundle, rows).rows if r[-1] != "n/a")
    assert len(mdes) == 2 and mdes[0] < mdes[1]
    assert seeds_sentence(rows).endswith(f"is {mdes[0]:.1f} to {mdes[1]:.1f} points (a claim's own: the table's "
                                         "last column).")


def test_a_claim_with_a_model_that_did_not_learn_has_no_verdict_and_says_which():
    bundle = bundle_with()
    for r in bundle["models"]["student"]["runs"]:
        if r["fraction"] == 0.1:
            r["predictions"] = [2] * len(TEST_LABELS)
    rows = significance_rows(bundle, [["hdkd", "student"]], CLAIMS[:1])
    assert claims_table(bundle, rows).rows[0][5] == "no verdict (Student did not learn)"
    assert significance_table(rows).rows[0][-1] == "student"


def test_markdown_escapes_pipes_and_aligns_numbers_right_and_csv_ends_lines_with_newlines():
    table = Table("t", "A title", ("Name", "Value"), (("a|b", "1.00"), ("c", "2.00")), "A note.")
    assert table_markdown(table) == ("## A title\n\n| Name | Value |\n| :--- | ---: |\n| a\\|b | 1.00 |\n"
                                     "| c | 2.00 |\n\nA note.\n")
    assert table_markdown(Table("t", "T", ("A",), ())) == "## T\n\n| A |\n| :--- |\n"
    assert table_csv(table) == "Name,Value\na|b,1.00\nc,2.00\n"


def test_an_ablations_difference_is_rounded_once_to_a_hundredth_of_a_point():
    # 0.004996 points: +0.00 (rounded twice, through 0.005, it would print +0.01)
    c = Comparison(0.00004996, -0.0000004996, 0.0001, 0.5, "paired_t")
    assert points_difference(c, 0.75) == "+0.00 [+0.00, +0.01], p = 0.5 (Holm 0.75)"  # never -0.00
    assert points_difference(Comparison(-0.0000001, None, None, None, "paired_t"), None).startswith("+0.00 (no test: ")
    assert points_difference(None, None) == "n/a"


def test_the_readmes_sentences_name_the_runs_models_and_speak_of_accuracy_alone():
    bundle = kd_bundle()
    pairs = [["hdkd", "logit_kd"], ["logit_kd", "student"]]
    rows = significance_rows(bundle, pairs)
    first, second = significance_sentences(bundle, rows, pairs)
    assert first.startswith("HDKD vs Logit-only KD: +0.0 points accuracy")
    assert second.startswith("Logit-only KD vs Student: +7.5 points accuracy")


STUDY = ROOT / "reports" / "study"


@pytest.fixture(scope="module")
def study():
    """The committed study's bundle and its significance rows, as its report computed them (read once: 1.4 MB)."""
    bundle = load_bundle(STUDY / "bundle.json")
    return bundle, report_significance(bundle, study_report_config(bundle))[1]


def test_the_committed_studys_tables_come_back_from_its_bundle_character_for_character(study):
    # Every header, note, label and figure of the tables a reader of reports/study/ sees, rebuilt from the bundle
    # they were made from (what check_reports does with the whole report, in the slow suite).
    bundle, significance = study
    tables = report_tables(bundle, significance=significance)
    assert {t.name for t in tables} == {p.stem for p in (STUDY / "tables").glob("*.md")}
    for table in tables:
        assert table_markdown(table) == (STUDY / "tables" / f"{table.name}.md").read_text(encoding="utf-8"), table.name
        assert table_csv(table) == (STUDY / "tables" / f"{table.name}.csv").read_text(encoding="utf-8"), table.name


def claim_rows(*sds, n_seeds=5):
    return [{"family": "primary", "difference_sd": sd, "n_seeds": n_seeds, "p_value": 0.5} for sd in sds]


def test_the_seeds_sentence_says_enough_when_every_claim_has_the_seeds_it_needs_and_nothing_when_none_can():
    assert seeds_sentence(claim_rows(0.001, 0.002)).endswith("needs 3 seeds; this run used 5, enough.")
    assert seeds_sentence(claim_rows(0.001, 0.002, n_seeds=3)).endswith("needs 3 seeds; this run used 3, enough.")
    assert seeds_sentence(claim_rows(1.0)) == ""  # beyond 10,000 seeds: the claims table says n/a
    assert seeds_sentence(claim_rows(0.001)).endswith(  # one claim: α alone (t = 21 at 2 seeds against 12.7)
        "in every claim at α/m = 0.05 (conservative: Holm's strictest step) needs 2 seeds; this run used 5, enough.")
    assert seeds_sentence([{**r, "family": "exploratory"} for r in claim_rows(0.001)]) == ""


def test_the_committed_studys_readme_holds_its_seeds_sentence(study):
    _, significance = study
    sentence = seeds_sentence(significance)
    assert sentence.startswith("Seeds: ") and sentence in (STUDY / "README.md").read_text(encoding="utf-8")


def test_a_model_not_timed_at_a_batch_size_gets_na_there():
    bundle = bundle_with()
    timing = bundle["models"]["hdkd"]["efficiency"]["timing"]
    timing.append({**timing[0], "batch_size": 32, "ms_per_image": 2.0, "images_per_s": 500.0})
    eff = efficiency_table(bundle)
    assert eff.columns[-2:] == ("CPU ms/img (bs 32)", "CPU img/s (bs 32)")
    assert [r[-2:] for r in eff.rows] == [("n/a", "n/a"), ("n/a", "n/a"), ("2.000", "500.0")]


def test_the_committed_reports_tables_come_back_from_its_bundle_and_export_character_for_character():
    reports = ROOT / "reports"
    bundle = load_bundle(reports / "bundle.json")
    _, significance = report_significance(bundle, load_params(ROOT / "params.yaml").report)
    tables = report_tables(bundle, export=read_json(reports / "export.json"), significance=significance)
    assert "efficiency" in {t.name for t in tables}
    for table in tables:
        assert table_markdown(table) == (reports / "tables" / f"{table.name}.md").read_text(encoding="utf-8"), table.name
        assert table_csv(table) == (reports / "tables" / f"{table.name}.csv").read_text(encoding="utf-8"), table.name


def test_whether_a_model_learned_is_told_at_the_fraction_asked():
    bundle = bundle_with()
    for r in bundle["models"]["student"]["runs"]:
        if r["fraction"] == 0.1:
            r["predictions"] = [2] * len(TEST_LABELS)
    assert learned(bundle, "student", 0.1) == "no (3 of 3 seeds)"
    assert learned(bundle, "student") == learned(bundle, "student", 1.0) == "yes"


def test_a_bundle_older_than_the_steps_budget_says_its_curve_was_trained_by_epochs():
    bundle = bundle_with()
    del bundle["params"]["train"]["budget"]
    assert "(train.budget: epochs)" in data_efficiency_table(bundle).note


def test_without_bootstrap_the_main_notes_sentence_stands_between_the_others():
    note = main_table(without_bootstrap(bundle_with())).note
    assert "one image. No bootstrap confidence intervals (evaluate.bootstrap = 0). Did not learn:" in note


def test_a_billion_parameters_print_as_1000_million():
    bundle = bundle_with()
    bundle["models"]["teacher"]["efficiency"]["params"]["total"] = 1_000_000_000
    assert rows_of(main_table(bundle))["Teacher"]["Params (M)"] == "1000.000"


def test_a_claim_whose_two_models_did_not_learn_names_both():
    bundle = kd_bundle()
    for m in ("logit_kd", "student"):
        for r in bundle["models"][m]["runs"]:
            if r["fraction"] == 0.1:
                r["predictions"] = [2] * len(TEST_LABELS)
    claim = {**CLAIMS[0], "compare": ["logit_kd", "student"]}
    rows = significance_rows(bundle, [], [claim])
    assert claims_table(bundle, rows).rows[0][5] == "no verdict (Logit-only KD and Student did not learn)"
    assert significance_table(rows).rows[0][-1] == "logit_kd, student"


def test_macs_print_in_millions_to_a_tenth_at_any_size():
    bundle = bundle_with()
    bundle["models"]["teacher"]["efficiency"]["macs"] = 200_000_000_000  # a 200 GMAC network
    assert rows_of(main_table(bundle))["Teacher"]["MACs (M)"] == "200000.0"


def test_a_claim_that_no_count_of_seeds_would_settle_says_na_and_a_missing_value_prints_na():
    bundle = bundle_with()
    rows = significance_rows(bundle, [["hdkd", "student"]], CLAIMS)
    rows[0] = {**rows[0], "difference_sd": 1.0}  # 100 points of spread between seeds: beyond 10,000 seeds
    assert claims_table(bundle, rows).rows[0][7] == "n/a"
    assert pct(None) == "n/a" and pct(0.25) == "25.00"


def test_the_significance_tables_fractions_print_as_params_yaml_writes_them():
    rows = significance_rows(bundle_with(), [["hdkd", "student"]], CLAIMS)
    rows[0] = {**rows[0], "fraction": 1e-05, "minus_fraction": 2.5e-05}  # yaml.safe_dump writes 1.0e-05
    assert significance_table(rows).rows[0][2:4] == ("1e-05", "2.5e-05")
