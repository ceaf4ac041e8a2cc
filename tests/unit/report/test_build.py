"""Tables (exact text), ablation grouping, figures (valid, deterministic PNGs) and the README."""

import errno
import struct

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar

from hdkd.evidence.aggregate import runs_at, sentence, significance_rows
from hdkd.evidence.plots import EXTRA_COLORS, model_color
from hdkd.evidence.stats import Comparison, paired_t
from hdkd.infra.io import DiskFullError
from hdkd.report import build, figures
from hdkd.report.ablations import ABLATIONS, group_ablations
from hdkd.report.build import build_report
from hdkd.report.check import Tolerance
from hdkd.report.readme import Explanations
from hdkd.report.stage import stage_extras
from hdkd.report.tables import (
    ablation_table,
    data_efficiency_table,
    efficiency_table,
    learned,
    main_table,
    per_class_table,
    points_difference,
    significance_table,
    table_csv,
    table_markdown,
)
from hdkd.roster import ROSTER
from tests.helpers.bundles import bundle_with
from tests.helpers.params import section

REPORT = section("report")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_main_table_markdown_exact(bundle):
    # Seed 0's run (hand numbers), then mean ± sample std over hand_runs' seeds: the teacher's three
    # accuracies are 90, 87.5, 85 -> 87.50 ± 2.50; the student's 80, 75, 70 -> 75.00 ± 5.00.
    assert table_markdown(main_table(bundle)) == (
        "## Main comparison\n"
        "\n"
        "| Model | Params (M) | MACs (M) | Accuracy (%) | Accuracy 95% CI | Precision (%) | Recall (%) | F1 (%) "
        "| F1 95% CI | Accuracy mean ± std (%) | F1 mean ± std (%) | Seeds | Learned |\n"
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| Teacher | 3.949 | 5812.3 | 90.00 | [85.00, 95.00] | 80.00 | 70.00 | 75.00 | [70.00, 80.00] "
        "| 87.50 ± 2.50 | 77.50 ± 2.50 | 3 | yes |\n"
        "| Student | 3.725 | 2050.0 | 80.00 | [75.00, 85.00] | 70.00 | 60.00 | 65.00 | [60.00, 70.00] "
        "| 75.00 ± 5.00 | 65.00 ± 5.00 | 3 | yes |\n"
        "| HDKD | 3.727 | 2060.0 | 85.00 | [80.00, 90.00] | 75.00 | 65.00 | 70.00 | [65.00, 75.00] "
        "| 82.50 ± 2.50 | 72.50 ± 2.50 | 3 | yes |\n"
        "\n"
        "Test split of toy, every model trained on the whole training split. Accuracy to F1 CI: seed 0's run; "
        "mean ± std: mean and sample standard deviation over the training seeds. Precision, recall and F1 are "
        "macro averages over all 3 classes; MACs for one image. CI: percentile bootstrap over test images, 1000 "
        "resamples, seed 0. Did not learn: at least 95 % of a run's test predictions are one class (more than that "
        "class's share of the test labels); a model did not learn at a training fraction when most of its seeds did "
        "not, and gets no verdict. Teacher: CNN; Student: hybrid CNN + transformer; HDKD: the student distilled from the "
        "teacher.\n"
    )


def one_class(bundle, model, seeds, fraction=1.0):
    """``bundle`` with ``model``'s runs at ``seeds`` answering nv (half the test images) for every image."""
    for run in bundle["models"][model]["runs"]:
        if run["seed"] in seeds and run["fraction"] == fraction:
            run["predictions"] = [2] * len(run["predictions"])
    return bundle


def test_a_model_that_did_not_learn_is_marked(bundle):
    one_class(bundle, "student", {0, 1})
    one_class(bundle, "hdkd", {2})
    assert [row[-1] for row in main_table(bundle).rows] == ["yes", "no (2 of 3 seeds)", "yes (1 of 3 seeds did not)"]
    assert learned(bundle, "student", 0.5) == "yes"
    rows = {(r[0], r[1]): r[-2:] for r in data_efficiency_table(bundle).rows}
    assert rows["1", "student"] == ("2", "yes") and rows["1", "hdkd"] == ("1", "no") and rows["0.5", "student"] == (
        "0", "no")
    table = significance_table(significance_rows(bundle, [("hdkd", "student"), ("hdkd", "teacher")]))
    flagged = {(r[1], r[2], r[-1]) for r in table.rows}
    assert ("hdkd vs student", "1", "student") in flagged and ("hdkd vs teacher", "1", "none") in flagged
    assert ("hdkd vs student", "0.5", "none") in flagged


def test_the_data_efficiency_figure_opens_the_markers_of_a_model_that_did_not_learn(bundle):
    def open_markers(fig):
        return [(line.get_xdata().tolist(), line.get_label()) for line in fig.axes[0].get_lines()
                if line.get_markerfacecolor() == "white"]

    assert open_markers(figures.data_efficiency_figure(bundle)) == []
    fig = figures.data_efficiency_figure(one_class(bundle, "hdkd", {0, 1}, fraction=0.25))
    assert [x for x, _ in open_markers(fig)] == [[25.0], []]  # HDKD's 25 % point, and the legend's entry
    assert "did not learn" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_data_efficiency_table_follows_the_contract(bundle):
    table = data_efficiency_table(bundle)
    assert table.columns == ("fraction", "model", "accuracy_mean", "accuracy_std", "f1_macro_mean", "f1_macro_std",
                             "n_seeds", "seeds_did_not_learn", "did_not_learn")
    rows = {(r[0], r[1]): r[2:] for r in table.rows}
    assert len(rows) == 4 * 3
    assert rows[("1", "student")] == ("0.7500", "0.0500", "0.6500", "0.0500", "3", "0", "no")
    # teacher at 10 %: k = round(40 (1 - 0.9 * 0.73)) + s = 14, 15, 16 errors of 40
    assert rows[("0.1", "teacher")][:2] == ("0.6250", "0.0250")


def test_significance_table_rows_are_scipys_and_statsmodels(bundle):
    table = significance_table(significance_rows(bundle, [("hdkd", "student")]))
    assert table.columns == ("family", "comparison", "fraction", "minus_fraction", "metric", "difference_mean",
                             "ci_low", "ci_high", "effect_size", "p_value", "p_value_holm", "test", "did_not_learn")
    assert {r[0] for r in table.rows} == {"exploratory"} and {r[3] for r in table.rows} == {"n/a"}  # no claims
    table = significance_table(significance_rows(bundle, [("hdkd", "student")]))
    table = type(table)(table.name, table.title, table.columns[1:3] + table.columns[4:],
                        tuple(r[1:3] + r[4:] for r in table.rows))  # the columns of every row, less the claims'
    row = next(r for r in table.rows if r[1] == "1" and r[2] == "accuracy" and r[9] == "paired_t")
    hdkd = [r["evaluation"]["accuracy"] for r in bundle["models"]["hdkd"]["runs"] if r["fraction"] == 1.0]
    student = [r["evaluation"]["accuracy"] for r in bundle["models"]["student"]["runs"] if r["fraction"] == 1.0]
    t = sps.ttest_rel(hdkd, student)
    ci = t.confidence_interval(0.95)
    assert row[3:6] + row[7:8] == (f"{np.mean(hdkd) - np.mean(student):.4f}", f"{ci.low:.4f}", f"{ci.high:.4f}",
                                   f"{t.pvalue:.4g}")
    # differences +5, +7.5, +10 points: mean 7.5 over sample sd 2.5
    assert row[6] == "3.000"
    # Holm over the table's 8 paired t-tests (4 fractions x 2 metrics); the smallest p is this one: 8 x p
    assert row[8] == f"{8 * t.pvalue:.4g}" == "0.2808"
    seed0 = next(r for r in table.rows if r[1] == "1" and r[9] == "mcnemar_exact_seed0")
    runs = {m: next(r for r in bundle["models"][m]["runs"] if r["fraction"] == 1.0 and r["seed"] == 0)
            for m in ("hdkd", "student")}
    labels = np.asarray(bundle["test_labels"])
    a, b = (np.asarray(runs[m]["predictions"]) == labels for m in ("hdkd", "student"))
    table_2x2 = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    assert seed0[7] == f"{mcnemar(table_2x2, exact=True).pvalue:.4g}"
    assert (seed0[6], seed0[8]) == ("n/a", "n/a")  # McNemar rows: per-seed detail, outside the Holm family


def test_the_readme_says_whether_each_comparison_is_significant(tmp_path, bundle):
    build_report(bundle, tmp_path, REPORT)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    # hdkd - student per seed: 85-80, 82.5-75, 80-70 points -> mean +7.5
    assert "- HDKD vs Student: +7.5 points accuracy [" in text
    # t(2) = 5.196 -> half-width 6.21 points, p = 0.0351 (by hand and scipy, as in test_model_card); Holm over the
    # 16 tests with a p (hdkd vs student and student vs teacher at 4 fractions x 2 metrics; hdkd vs teacher differs
    # by the same at every seed): the 8 student vs teacher p-values are smaller (0.0131, 0.0202), so 0.0351 is the
    # 9th smallest: (16 - 8) x 0.0351 = 0.281, above those before it; the verdict is the adjusted p's
    assert ("- HDKD vs Student: +7.5 points accuracy [+1.3, +13.7], p = 0.0351 (Holm-adjusted 0.281): not "
            "significant at 0.05 (paired t over 3 seeds).\n") in text
    assert "p Holm-adjusted within its family (one family of 16 paired t-tests) of the [paired comparisons]" in text
    # student - teacher: -10, -12.5, -15 points; hdkd - teacher: -5 at every seed, so no test
    # 0.0131 is the smallest p: 16 x 0.0131 = 0.209
    assert ("- Student vs Teacher: -12.5 points accuracy [-18.7, -6.3], p = 0.0131 (Holm-adjusted 0.209): not "
            "significant at 0.05 (paired t over 3 seeds).\n") in text
    assert "- HDKD vs Teacher: -5.0 points accuracy; no test (the same at every seed).\n" in text


def test_per_class_csv_exact(bundle):
    assert table_csv(per_class_table(bundle)) == (
        "Class,Support,Teacher P (%),Teacher R (%),Teacher F1 (%),Student P (%),Student R (%),Student F1 (%),"
        "HDKD P (%),HDKD R (%),HDKD F1 (%)\n"
        "akiec,10,50.00,25.00,50.00,50.00,25.00,25.00,50.00,25.00,37.50\n"
        "bcc,10,50.00,25.00,75.00,50.00,25.00,50.00,50.00,25.00,62.50\n"
        "nv,20,50.00,25.00,100.00,50.00,25.00,87.50,50.00,25.00,93.75\n"
    )


def test_missing_efficiency_and_ci_print_na(bundle):
    bundle["models"]["hdkd"]["efficiency"] = None
    bundle["models"]["hdkd"]["evaluation"]["ci"] = None
    assert main_table(bundle).rows[2] == ("HDKD", "n/a", "n/a", "85.00", "n/a", "75.00", "65.00", "70.00", "n/a",
                                          "82.50 ± 2.50", "72.50 ± 2.50", "3", "yes")


def lambda_runs():
    return [bundle_with({"distill": {"lambda": lam}}, shift=shift) for lam, shift in ((5.0, -0.05), (1.0, -0.1))]


def test_ablation_table_exact(bundle):
    l5, l1 = lambda_runs()
    # λ = 1 loses 5, 10 and 15 points to the reference at seeds 0, 1, 2, λ = 5 half as much: mean -10 (-5), sd 5
    # (2.5), t(2) = -3.464 -> half-width 4.303 * 5 / sqrt(3) = 12.42 points (6.21), p = 0.0742 (scipy.stats.ttest_rel)
    # for both. Holm over the table's 2 tests: 2 x 0.0742 = 0.148 for the smaller p, max(0.148, 0.0742) for the other
    reference_runs = runs_at(bundle, "hdkd", 1.0)
    for seed, run in runs_at(l1, "hdkd", 1.0).items():
        run["evaluation"]["accuracy"] = reference_runs[seed]["evaluation"]["accuracy"] - 0.05 * (seed + 1)
    for seed, run in runs_at(l5, "hdkd", 1.0).items():
        run["evaluation"]["accuracy"] = reference_runs[seed]["evaluation"]["accuracy"] - 0.025 * (seed + 1)
    lam = next(a for a in ABLATIONS if a.name == "lambda")
    assert table_markdown(ablation_table(lam, bundle, [l5, l1])) == (
        "## Ablation: feature distillation weight λ\n"
        "\n"
        "| λ | Run (params hash) | Reference | HDKD Accuracy mean ± std (%) | HDKD F1 mean ± std (%) "
        "| HDKD Accuracy Δ vs reference (points) | HDKD Accuracy (%) | HDKD Accuracy 95% CI | HDKD F1 (%) |\n"
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"| 1 | {l1['params_hash']} | no | 72.50 ± 7.50 | 62.50 ± 2.50 | -10.00 [-22.42, +2.42], p = 0.0742 "
        "(Holm 0.148) | 75.00 | [70.00, 80.00] | 70.00 |\n"
        f"| 5 | {l5['params_hash']} | no | 77.50 ± 5.00 | 67.50 ± 2.50 | -5.00 [-11.21, +1.21], p = 0.0742 (Holm 0.148) "
        "| 80.00 | [75.00, 85.00] | 70.00 |\n"
        f"| 10 | {bundle['params_hash']} | yes | 82.50 ± 2.50 | 72.50 ± 2.50 | reference | 85.00 | [80.00, 90.00] "
        "| 70.00 |\n"
        "\n"
        "Runs differing from the reference only in distill.lambda; F1 is macro. Mean ± sample std over each run's "
        "training seeds, on the whole training split. Δ: the run's accuracy minus the reference's, paired by seed on "
        "the same test images: mean [95% CI], p of the paired t over the seeds both ran, and (Holm) that p adjusted "
        "over this table's 2 paired t-tests. The other columns: seed 0's run. Did not learn: at least 95 % of a run's "
        "test predictions are one class (more than that class's share of the test labels); a model did not learn at "
        "a training fraction when most of its seeds did not, and gets no verdict.\n"
    )


def test_ablation_cells_of_a_run_that_did_not_learn_say_so(bundle):
    l5, l1 = lambda_runs()
    one_class(l1, "hdkd", {0, 1, 2})
    lam = next(a for a in ABLATIONS if a.name == "lambda")
    cells = {row[0]: row[5] for row in ablation_table(lam, bundle, [l5, l1]).rows}
    assert cells["1"].endswith("; did not learn") and not cells["5"].endswith("did not learn")
    assert cells["10"] == "reference"
    assert ablation_table(lam, one_class(bundle, "hdkd", {0, 1}), [l5]).rows[-1][5] == "reference; did not learn"


def test_points_difference_cells():
    assert points_difference(Comparison(-1e-9, -0.0062, 0.0062, 0.5, "paired_t"), 1.0) == (
        "+0.00 [-0.62, +0.62], p = 0.5 (Holm 1)")
    assert points_difference(Comparison(0.05, None, None, None, "paired_t"), None) == "+5.00 (no test: one seed)"
    assert points_difference(Comparison(-0.05, -0.05, -0.05, None, "paired_t"), None) == (
        "-5.00 (no test: the same at every seed)")
    assert points_difference(None, None) == "n/a"


def test_a_difference_of_zero_at_every_seed_reads_the_same_in_a_table_and_a_sentence():
    # One rule (Comparison.untested): both print the paired t's p = 1, neither says "no test".
    zero = paired_t([0.75, 0.80, 0.70], [0.75, 0.80, 0.70])
    row = {"metric": "accuracy", **zero.as_dict(), "p_value_holm": 1.0, "n_seeds": 3}
    assert points_difference(zero, 1.0) == "+0.00 [+0.00, +0.00], p = 1 (Holm 1)"
    assert sentence(row, "HDKD", "Student") == (
        "HDKD vs Student: +0.0 points accuracy [+0.0, +0.0], p = 1 (Holm-adjusted 1): not significant at 0.05 "
        "(paired t over 3 seeds).")


def test_stage_ablation_rows_go_from_fewer_to_more_stages(bundle):
    stages = next(a for a in ABLATIONS if a.name == "stages")
    runs = [bundle_with({"distill": {"stages": s}}) for s in ([2, 3], [1], [3])]
    assert [row[0] for row in ablation_table(stages, bundle, runs).rows] == ["1", "3", "2, 3", "1, 2, 3"]


def test_an_ablation_run_tested_on_other_images_or_seeds_gets_no_difference(bundle):
    lam = next(a for a in ABLATIONS if a.name == "lambda")
    other_images, other_seeds = lambda_runs()
    other_images["test_labels"] = list(reversed(other_images["test_labels"]))
    for run in other_seeds["models"]["hdkd"]["runs"]:
        run["seed"] += 10
    rows = {r[1]: r for r in ablation_table(lam, bundle, [other_images, other_seeds]).rows}
    assert rows[other_images["params_hash"]][5] == rows[other_seeds["params_hash"]][5] == "n/a"


def test_runs_are_grouped_by_the_params_they_change(bundle):
    l5, l1 = lambda_runs()
    l1_again = bundle_with({"distill": {"lambda": 1.0}}, git_commit="f" * 40)  # same params, other commit
    alpha = bundle_with({"distill": {"alpha": 0.25}})
    alpha_tau = bundle_with({"distill": {"alpha": 0.25, "tau": 2.0}})
    confounded = bundle_with({"distill": {"lambda": 1.0}, "model": {"block": "mbconv"}})
    same = bundle_with({"tracking": {"uri": "sqlite:///elsewhere.db"}, "train": {"num_workers": 4}})
    stride = bundle_with({"model": {"stem_stride": 4}})
    groups, unused = group_ablations(bundle, [l5, l1, l1_again, alpha, alpha_tau, confounded, same, stride])
    assert {name: sorted(b["params_hash"] for b in runs) for name, runs in groups.items()} == {
        "lambda": sorted([l5["params_hash"], l1["params_hash"]]),
        "alpha_tau": sorted([alpha["params_hash"], alpha_tau["params_hash"]]),
        "stem_stride": [stride["params_hash"]],
    }
    assert sorted(diff for _, diff in unused) == [[], ["distill.lambda"], ["distill.lambda", "model.block"]]


def test_ablations_are_compared_with_their_own_reference(tmp_path, bundle):
    # ablations run at an earlier default (train.grad_clip 1): against the report's run they differ in two keys
    earlier = {"train": {"grad_clip": 1.0}}
    reference = bundle_with(earlier, shift=-0.05, git_commit="e" * 40)
    runs = [bundle_with(earlier | {"distill": {"lambda": 1.0}}, shift=-0.1)]
    build_report(bundle, tmp_path / "own", REPORT, runs, ablation_reference=reference)
    table = (tmp_path / "own" / "tables" / "ablation_lambda.csv").read_text(encoding="utf-8").splitlines()
    assert [line.split(",")[1:3] for line in table[1:]] == [[runs[0]["params_hash"], "no"],
                                                            [reference["params_hash"], "yes"]]
    assert bundle["params_hash"] not in "\n".join(table)
    readme = (tmp_path / "own" / "README.md").read_text(encoding="utf-8")
    assert (f"The ablation tables compare each run with the reference run {'e' * 12} (commit `{'e' * 40}`, params "
            f"hash `{reference['params_hash']}`, `ablations/reference.json`). The ablations were run at an earlier "
            "default than this report's run, which differs in train.grad_clip: to rerun them at this one, "
            "`python -m pipeline.ablations queue`, `dvc queue start`, then `python -m pipeline.ablations collect`."
            ) in readme
    assert f"| `{runs[0]['params_hash']}` | distill.lambda | ablation_lambda |" in readme
    # without a reference of their own, they are compared with the report's run, and are no ablation of it
    written = build_report(bundle, tmp_path / "main", REPORT, runs)
    assert not [p for p in written if "ablation" in p.name]
    readme = (tmp_path / "main" / "README.md").read_text(encoding="utf-8")
    assert f"params hash `{bundle['params_hash']}`)." in readme and "earlier default" not in readme
    assert f"| `{runs[0]['params_hash']}` | distill.lambda, train.grad_clip | not used |" in readme
    # a reference of the report's params (another run of them) is said to be so
    build_report(bundle, tmp_path / "same", REPORT, lambda_runs(), ablation_reference=bundle_with(shift=0.1))
    assert "Its results params are this report's run's." in (tmp_path / "same" / "README.md").read_text()


def test_the_working_tree_ablations_keep_their_reference_apart(tmp_path, bundle):
    from hdkd.infra.io import write_json
    from hdkd.report.stage import working_tree_inputs

    reference, (l5, l1) = bundle_with(shift=0.1), lambda_runs()
    write_json(tmp_path / "bundle.json", bundle)
    for name, b in (("reference", reference), ("abl-lambda-5", l5), ("abl-lambda-1", l1)):
        write_json(tmp_path / "ablations" / f"{name}.json", b)
    main, runs, own = working_tree_inputs(tmp_path / "bundle.json", tmp_path / "ablations")
    assert (main, runs, own) == (bundle, [l1, l5], reference)
    (tmp_path / "ablations" / "reference.json").unlink()
    assert working_tree_inputs(tmp_path / "bundle.json", tmp_path / "ablations")[2] is None


def test_no_ablation_table_without_differing_runs(tmp_path, bundle):
    same = bundle_with({"tracking": {"enabled": False}})
    written = build_report(bundle, tmp_path, REPORT, [same])
    assert not [p for p in written if "ablation" in p.name]
    assert f"| `{same['params_hash']}` | nothing | not used |\n" in (tmp_path / "README.md").read_text(encoding="utf-8")


def build_full(out, bundle):
    stages = [bundle_with({"distill": {"stages": s}}, shift=-0.05 * len(s)) for s in ([3], [2, 3])]
    return build_report(bundle, out, REPORT, [*lambda_runs(), *stages])


def test_build_report_writes_tables_figures_and_readme(tmp_path, bundle):
    out = tmp_path / "reports"
    written = build_full(out, bundle)
    names = sorted(p.relative_to(out).as_posix() for p in written)
    tables = ["main", "data_efficiency", "significance", "metrics", "per_class", "efficiency", "ablation_lambda",
              "ablation_stages"]
    figures = ["confusion_teacher", "confusion_student", "confusion_hdkd", "training_curves", "per_class_f1",
               "data_efficiency"]
    assert names == sorted([f"tables/{t}.{s}" for t in tables for s in ("md", "csv")]
                           + [f"figures/{f}.png" for f in figures] + ["model_card.md", "README.md"])
    for f in figures:
        width, height = png_size((out / "figures" / f"{f}.png").read_bytes())
        assert 300 <= width <= 3000 and 300 <= height <= 3000, f
    for path in written:
        if path.suffix in (".md", ".csv"):
            assert "\r" not in path.read_text(encoding="utf-8")

    readme = (out / "README.md").read_text(encoding="utf-8")
    assert f"`{bundle['git_commit']}`" in readme and f"`{bundle['params_hash']}`" in readme
    assert "Dataset: toy (3 classes: akiec, bcc, nv)" in readme
    for name in tables:
        assert f"(tables/{name}.md)" in readme
    for name in figures:
        assert f"(figures/{name}.png)" in readme
    assert "## Other runs" in readme  # every ablation run, with what it differs in and where it is used
    assert readme.count("| distill.lambda | ablation_lambda |\n") == 2
    assert readme.count("| distill.stages | ablation_stages |\n") == 2


def test_report_is_byte_deterministic(tmp_path, bundle):
    a, b = build_full(tmp_path / "a", bundle), build_full(tmp_path / "b", bundle)
    for pa, pb in zip(a, b):
        assert pa.relative_to(tmp_path / "a") == pb.relative_to(tmp_path / "b")
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_confusion_option_changes_the_figure(tmp_path, bundle):
    build_report(bundle, tmp_path / "n", section("report", confusion_normalize=True))
    build_report(bundle, tmp_path / "c", section("report", confusion_normalize=False))
    fig = "figures/confusion_teacher.png"
    assert (tmp_path / "n" / fig).read_bytes() != (tmp_path / "c" / fig).read_bytes()


def test_stale_report_files_are_removed(tmp_path, bundle):
    stale = tmp_path / "tables" / "ablation_lambda.md"
    stale.parent.mkdir()
    stale.write_text("from an older build")
    build_report(bundle, tmp_path, REPORT)
    assert not stale.exists() and (tmp_path / "tables" / "main.md").is_file()


def test_a_failed_build_leaves_the_previous_report_whole(tmp_path, bundle, monkeypatch):
    written = build_report(bundle, tmp_path, REPORT)
    before = {p: p.read_bytes() for p in written}
    real, calls = build.figure_png, []

    def second_figure_hits_a_full_disk(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(build, "figure_png", second_figure_hits_a_full_disk)
    with pytest.raises(DiskFullError, match=r"no space left on device for \S+tables, \S+figures: .* free in .*the previous version took"):
        build_report(bundle, tmp_path, REPORT)
    assert {p: p.read_bytes() for p in written} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "figures", "model_card.md", "tables"]  # no temporaries


def test_model_colors_are_the_same_in_every_figure():
    # the training curves and the report's figures colour a model alike: by its place among the extra models
    names = ["teacher", "student", "hdkd", "kd", "dkd"]
    assert [model_color(m, names) for m in names] == [*(m.color for m in ROSTER), *EXTRA_COLORS[:2]]
    assert model_color("kd", ["kd"]) == model_color("kd", names)


def test_bundles_of_different_test_sets_are_refused(bundle):
    bundle["models"]["hdkd"]["evaluation"]["per_class"][0]["support"] = 11
    with pytest.raises(ValueError, match="different test sets"):
        per_class_table(bundle)


def _export_report(models: dict[str, float]) -> dict:
    return {"models": {m: {"timing_cpu": {f"bs{b}": {"batch_size": b, "onnxruntime_ms_per_image": ms / b}
                                          for b in (1, 32)}} for m, ms in models.items()}}


def test_the_efficiency_table_gains_onnx_runtime_latency_for_the_exported_models(bundle):
    table = efficiency_table(bundle, _export_report({"teacher": 2.0, "hdkd": 1.0}))
    assert table.columns[-2:] == ("ONNX Runtime CPU ms/img (bs 1)", "ONNX Runtime CPU ms/img (bs 32)")
    rows = {row[0]: row for row in table.rows}
    assert rows["Teacher"][-2:] == ("2.000", "0.062") and rows["HDKD"][-2:] == ("1.000", "0.031")
    assert rows["Student"][-2:] == ("n/a", "n/a")  # not exported
    assert "ONNX Runtime" in table.note and "ONNX" not in " ".join(efficiency_table(bundle).columns)
    assert all(Tolerance().ignores(f"efficiency.md:{c}") for c in table.columns[-2:])  # machine-dependent


def _explanations(rollout: float) -> Explanations:
    summary = {"defined": 12, "mean_spearman": 0.1, "per_image": []}
    return Explanations({"sanity_trained_vs_random": {"teacher_gradcam": summary,
                                                      "hdkd_rollout_cls": {**summary, "mean_spearman": rollout}},
                         "agreement_teacher_vs_hdkd_gradcam": {**summary, "mean_spearman": 0.625}},
                        "explain/explanations.png")


def test_the_readme_shows_where_the_models_look_and_the_sanity_check(tmp_path, bundle):
    build_report(bundle, tmp_path, REPORT, explain=_explanations(rollout=0.75))
    text = (tmp_path / "README.md").read_text()
    assert "](explain/explanations.png)" in text and "over 12 test images" in text
    assert "- Teacher Grad-CAM: 0.100 (passes)" in text
    assert "- HDKD attention rollout (class token): 0.750 (fails the check)" in text
    assert "agree with mean Spearman 0.625" in text
    build_report(bundle, tmp_path, REPORT)
    assert "Where the models look" not in (tmp_path / "README.md").read_text()


def test_the_report_stage_finds_what_export_and_explain_wrote(tmp_path):
    reports = tmp_path / "reports"
    assert stage_extras(reports / "export.json", reports / "explain", reports) == (None, None)
    (reports / "explain").mkdir(parents=True)
    (reports / "explain" / "explain.json").write_text('{"a": 1}')
    (reports / "export.json").write_text('{"models": {}}')
    export, explain = stage_extras(reports / "export.json", reports / "explain", reports)
    assert export == {"models": {}} and explain == Explanations({"a": 1}, "explain/explanations.png")
    assert stage_extras(reports / "export.json", reports / "explain", tmp_path / "elsewhere")[1].figure == \
        "../reports/explain/explanations.png"


CLAIMS = [
    {"claim": "HDKD is more accurate than the student trained alone, on a tenth of the data",
     "compare": ["hdkd", "student"], "fraction": 0.1, "minus_fraction": None, "metric": "accuracy"},
    {"claim": "HDKD is more accurate than its teacher", "compare": ["hdkd", "teacher"], "fraction": 1.0,
     "minus_fraction": None, "metric": "accuracy"},
    {"claim": "HDKD gains more over the student on a tenth of the data than on all of it",
     "compare": ["hdkd", "student"], "fraction": 0.1, "minus_fraction": 1.0, "metric": "accuracy"},
]


def test_the_readme_opens_with_the_claims_table_and_significance_names_each_rows_family(tmp_path, bundle):
    from hdkd.config import ReportConfig

    cfg = ReportConfig.model_validate({**REPORT.model_dump(), "claims": CLAIMS})  # the claims of a 4-fraction run
    build_report(bundle, tmp_path, cfg)
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    head = readme.split("\n")
    assert head[:6] == ["# HDKD results", "", "Generated by `hdkd.report` from the results bundle `bundle.json`; do not "
                        "edit by hand.", "", "## Claims", ""]
    assert readme.index("## Claims") < readme.index("- Dataset:") < readme.index("## Does HDKD help?")
    assert ("| Claim | Comparison | Paired difference [95 % CI] (points) | Effect size | Holm-adjusted p | Verdict "
            "| Seeds | Seeds for 1.5 points | Detectable now (points) |") in readme
    rows = significance_rows(bundle, [p for p in cfg.comparisons if "vit" not in p and "resnet" not in p], CLAIMS)
    first = rows[0]
    assert first["family"] == "primary" and first["comparison"] == "hdkd vs student" and first["fraction"] == 0.1
    from hdkd.evidence.aggregate import claim_verdict

    line = next(x for x in head if x.startswith("| HDKD is more accurate than the student trained alone"))
    assert (f"| HDKD − Student, accuracy, 10 % of the training data | {100 * first['difference_mean']:+.1f} "
            f"[{100 * first['ci_low']:+.1f}, {100 * first['ci_high']:+.1f}] | {first['effect_size']:.2f} "
            f"| {first['p_value_holm']:.4g} | {claim_verdict(first)} | 3 |") in line
    # HDKD - teacher: -5 points at every seed: no test, so not supported
    assert "| not supported (no test: the same at every seed) | 3 |" in readme
    assert ("| (HDKD − Student at 10 %) − (HDKD − Student at 100 %) of the training data, accuracy, paired by seed "
            in readme)
    assert "Seeds: from this run's per-seed differences" in readme
    csv = (tmp_path / "tables" / "significance.csv").read_text(encoding="utf-8").splitlines()
    assert csv[0].startswith("family,comparison,fraction,minus_fraction,metric,")
    families = [line.split(",")[0] for line in csv[1:]]
    assert families[:3] == ["primary"] * 3 and set(families[3:]) == {"exploratory"}
    assert csv[3].split(",")[1:4] == ["hdkd vs student", "0.1", "1"]
    assert (tmp_path / "tables" / "claims.csv").is_file()
    # the claimed tests are not repeated among the exploratory rows, which are adjusted apart
    assert not [line for line in csv[4:] if line.split(",")[1:5] == ["hdkd vs student", "0.1", "n/a", "accuracy"]
                and line.split(",")[11] == "paired_t"]
    assert ("the primary family holds 2 paired t-tests, the exploratory one 15"
            in (tmp_path / "tables" / "significance.md").read_text(encoding="utf-8"))


def test_ablations_of_another_data_set_never_enter_a_report(tmp_path, bundle):
    other = {"data": {"synthetic": {"layout": "brain_tumor_mri"}}}
    reference = bundle_with(other, shift=0.1)
    runs = [bundle_with(other | {"distill": {"lambda": lam}}, shift=-0.05) for lam in (5.0, 1.0)]
    written = build_report(bundle, tmp_path / "other", REPORT, runs, ablation_reference=reference)
    assert not [p for p in written if "ablation" in p.name]  # they would be ablations of their own reference
    readme = (tmp_path / "other" / "README.md").read_text(encoding="utf-8")
    assert ("## Ablations\n\nNo ablations exist for this data set, toy: the 2 ablation runs at hand were run on other "
            "data settings (differing in data.synthetic.layout) and are left out, since a report never mixes data "
            "sets.\n") in readme
    assert "## Other runs" not in readme and reference["params_hash"] not in readme
    # the same runs on the report's data are its ablations; one of them run on another data set is left out
    same = lambda_runs()
    written = build_report(bundle, tmp_path / "same", REPORT, [same[0], runs[1]], ablation_reference=bundle)
    table = (tmp_path / "same" / "tables" / "ablation_lambda.csv").read_text(encoding="utf-8")
    assert same[0]["params_hash"] in table and runs[1]["params_hash"] not in table
    assert "No ablations exist" not in (tmp_path / "same" / "README.md").read_text(encoding="utf-8")
    # a report without ablation runs says that none exist for its data
    build_report(bundle, tmp_path / "none", REPORT)
    assert "No ablations exist for this data set, toy.\n" in (tmp_path / "none" / "README.md").read_text()


def test_data_settings_ignore_keys_of_another_schema_and_compare_the_test_split(bundle):
    from hdkd.report.ablations import data_differences

    older = {**bundle, "params": {**bundle["params"], "data": {**bundle["params"]["data"], "train_fraction": 1.0}}}
    synthetic = dict(older["params"]["data"]["synthetic"])
    del synthetic["subtypes"], synthetic["nuisance"]  # before the variety keys: their neutral values
    older["params"]["data"]["synthetic"] = synthetic
    assert data_differences(bundle, older) == []
    varied = bundle_with({"data": {"synthetic": {"subtypes": 8}}})
    assert data_differences(bundle, varied) == ["data.synthetic.subtypes"]
    assert data_differences(bundle, {**bundle, "test_labels": bundle["test_labels"][::-1], "dataset": "x"}) == [
        "dataset", "test split"]


def test_the_readme_says_which_maps_were_withheld_and_why(tmp_path, bundle):
    explain = _explanations(rollout=0.75)
    results = {**explain.results,
               "input_dependence": {"teacher_gradcam": {"mean_spearman": 0.08}, "hdkd_rollout_cls": {"mean_spearman": 0.97}},
               "checks": {"teacher_gradcam": {"shown": True, "withheld_because": []},
                          "hdkd_rollout_cls": {"shown": False, "withheld_because": ["the same map on every image"]}},
               "check_limits": {"sanity_trained_vs_random": 0.5, "input_dependence": 0.8}}
    build_report(bundle, tmp_path, REPORT, explain=Explanations(results, explain.figure))
    text = (tmp_path / "README.md").read_text()
    assert "above 0.8: the same map on every image" in text
    assert "- Teacher Grad-CAM: 0.080 (shown)" in text
    assert "- HDKD attention rollout (class token): 0.970 (withheld: the same map on every image)" in text


def test_the_readme_says_how_far_each_model_falls_at_the_smallest_fraction():
    from hdkd.report.readme import data_matters_lines

    b = bundle_with()

    def mean_accuracy(model, fraction):
        values = [r["evaluation"]["accuracy"] for r in b["models"][model]["runs"] if r["fraction"] == fraction]
        return sum(values) / len(values)

    text = "\n".join(data_matters_lines(b))
    assert "with 10 % of the training data, minus with 100 %" in text
    for model, label in (("teacher", "Teacher"), ("student", "Student"), ("hdkd", "HDKD")):
        drop = 100 * (mean_accuracy(model, 0.1) - mean_accuracy(model, 1.0))
        assert drop < 0 and f"{label} {drop:+.1f}" in text
    for model in b["models"].values():  # one fraction: nothing to say
        model["runs"] = [r for r in model["runs"] if r["fraction"] == 1.0]
    assert data_matters_lines(b) == []
