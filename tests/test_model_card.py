"""The HDKD student's model card: numbers from the bundle, an honest comparison, weak spots, provenance."""

import copy

from conftest import CLASSES, bundle_with
from hdkd.report.build import build_report
from hdkd.report.model_card import comparison, model_card
from tests.params_fixtures import section


def test_the_card_quotes_the_bundle(bundle):
    card = model_card(bundle)
    assert card.startswith("# Model card: HDKD\n")
    assert "| HDKD | 85.00 % [80.00, 90.00] | 70.00 % [65.00, 75.00] | 65.00 % |" in card
    assert "| Student | 80.00 % [75.00, 85.00] | 65.00 % [60.00, 70.00] | 60.00 % |" in card
    assert "3,727,288 parameters, 2060.0 M MACs per image" in card
    assert "Git commit: `0123456789abcdef0123456789abcdef01234567`" in card and bundle["params_hash"] in card
    assert f"Test split: 40 images ({CLASSES[0]} 10, {CLASSES[1]} 10, {CLASSES[2]} 20)" in card
    assert "## Must not be used for" in card and "Diagnosis or any clinical decision" in card
    assert "synthetic" not in card.split("## Data")[0]  # the synthetic warning only for the embedded benchmark
    assert "trained on the embedded *synthetic* benchmark" in model_card({**bundle, "dataset": "synthetic"})
    assert "ms/image" not in card  # latency is machine-dependent: the reports check would trip on it


def test_weak_spots_are_the_lowest_f1_classes_and_the_most_frequent_confusion(bundle):
    weak = model_card(bundle).split("## Weak spots")[1].split("##")[0]
    lines = [line for line in weak.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines[:3]] == [f"- {c}" for c in CLASSES]  # F1 0.375 < 0.625 < 0.9375
    assert lines[0] == f"- {CLASSES[0]}: F1 37.50 %, recall 25.00 % (10 test images)"
    assert lines[3] == f"- Most frequent confusion: {CLASSES[0]} predicted as {CLASSES[1]} (2 of 10 images)."


def test_the_comparison_says_plainly_whether_hdkd_beats_the_student(bundle):
    assert comparison(bundle, "hdkd", "student") == (
        "HDKD vs Student: accuracy +5.00 points, higher (the 95 % intervals overlap); macro-F1 +5.00 points, "
        "higher (the 95 % intervals overlap). HDKD beats Student in this run.")
    worse = copy.deepcopy(bundle)
    ev = worse["models"]["hdkd"]["evaluation"]
    ev.update(f1_macro=0.5, ci={**ev["ci"], "f1_macro": [0.45, 0.55]})
    assert comparison(worse, "hdkd", "student").endswith(
        "macro-F1 -15.00 points, lower (the 95 % intervals do not overlap). HDKD does **not** beat Student in this run.")
    assert "HDKD does **not** beat Teacher" in model_card(bundle)  # 85 % vs 90 %


def test_the_report_writes_the_card_and_links_it(tmp_path):
    b = bundle_with()
    written = build_report(b, tmp_path, section("report"))
    assert tmp_path / "model_card.md" in written
    assert (tmp_path / "model_card.md").read_text() == model_card(b)
    assert "(model_card.md)" in (tmp_path / "README.md").read_text()
