"""The HDKD student's model card: numbers from the bundle, an honest comparison, weak spots, provenance."""


from hdkd.evidence.aggregate import significance_rows
from hdkd.report.build import build_report
from hdkd.report.model_card import comparison, model_card
from tests.helpers.bundles import CLASSES, bundle_with
from tests.helpers.params import section

PAIRS = [("hdkd", "student"), ("student", "teacher"), ("hdkd", "teacher")]  # report.comparisons in the bundle


def card(bundle):
    return model_card(bundle, significance_rows(bundle, PAIRS))


def test_the_card_quotes_the_bundle(bundle):
    text = card(bundle)
    assert text.startswith("# Model card: HDKD\n")
    # mean ± std over hand_runs' three seeds, then seed 0's run with its intervals
    assert "| HDKD | 82.50 % ± 2.50 | 72.50 % ± 2.50 | 3 | 85.00 % [80.00, 90.00] | 70.00 % [65.00, 75.00] | 65.00 % |" \
        in text
    assert "| Student | 75.00 % ± 5.00 | 65.00 % ± 5.00 | 3 | 80.00 % [75.00, 85.00] | 65.00 % [60.00, 70.00] " \
        "| 60.00 % |" in text
    assert "3,727,288 parameters, 2060.0 M MACs per image" in text
    assert "Git commit: `0123456789abcdef0123456789abcdef01234567`" in text and bundle["params_hash"] in text
    assert f"Test split: 40 images ({CLASSES[0]} 10, {CLASSES[1]} 10, {CLASSES[2]} 20)" in text
    assert "## Must not be used for" in text and "Diagnosis or any clinical decision" in text
    assert "synthetic" not in text.split("## Data")[0]  # the synthetic warning only for the embedded benchmark
    assert "trained on the embedded *synthetic* benchmark" in card({**bundle, "dataset": "synthetic"})
    assert "ms/image" not in text  # latency is machine-dependent: the reports check would trip on it


def test_weak_spots_are_the_lowest_f1_classes_and_the_most_frequent_confusion(bundle):
    weak = card(bundle).split("## Weak spots")[1].split("##")[0]
    lines = [line for line in weak.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines[:3]] == [f"- {c}" for c in CLASSES]  # F1 0.375 < 0.625 < 0.9375
    assert lines[0] == f"- {CLASSES[0]}: F1 37.50 %, recall 25.00 % (10 test images)"
    assert lines[3] == f"- Most frequent confusion: {CLASSES[0]} predicted as {CLASSES[1]} (2 of 10 images)."


def test_the_comparison_gives_the_paired_verdict_over_seeds(bundle):
    # hdkd - student per seed (hand_runs): +5, +7.5, +10 points -> mean +7.5, sd 2.5; t(2) = 5.196,
    # half-width 4.303 * 2.5 / sqrt(3) = 6.21 -> [+1.3, +13.7], p = 0.0351 (scipy.stats.ttest_rel). Holm: the family
    # is every paired t with a p of the table, 16 (as in test_report's README check): 0.0351 is the 9th smallest,
    # (16 - 8) x 0.0351 = 0.281
    assert comparison(bundle, significance_rows(bundle, PAIRS), "hdkd", "student") == (
        "HDKD vs Student: +7.5 points accuracy [+1.3, +13.7], p = 0.0351 (Holm-adjusted 0.281): not significant at "
        "0.05 (paired t over 3 seeds). HDKD vs Student: +7.5 points macro-F1 [+1.3, +13.7], p = 0.0351 "
        "(Holm-adjusted 0.281): not significant at 0.05 (paired t over 3 seeds).")
    # hdkd - teacher: -5 points at every seed (the same spread): no variance, so no t-test
    assert "HDKD vs Teacher: -5.0 points accuracy" in card(bundle)
    assert comparison(bundle, significance_rows(bundle, PAIRS[1:2]), "hdkd", "student") == ""  # not in the table


def test_a_model_that_did_not_learn_is_marked_and_gets_no_verdict(bundle):
    for run in bundle["models"]["student"]["runs"]:
        if run["fraction"] == 1.0 and run["seed"] in (0, 1):  # 2 of 3 seeds answer nv (half the test images)
            run["predictions"] = [2] * len(run["predictions"])
    text = card(bundle)
    assert "| Student (did not learn) | " in text and "| HDKD | " in text and "| Teacher | " in text
    assert "- HDKD vs Student: +7.5 points accuracy; no verdict: Student did not learn" in text
    assert "HDKD vs Teacher: -5.0 points accuracy; no test" in text


def test_the_report_writes_the_card_and_links_it(tmp_path):
    b = bundle_with()
    written = build_report(b, tmp_path, section("report"))
    assert tmp_path / "model_card.md" in written
    assert (tmp_path / "model_card.md").read_text() == card(b)
    assert "(model_card.md)" in (tmp_path / "README.md").read_text()
