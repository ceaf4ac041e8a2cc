"""The report check: passes on equal or within-tolerance reports, fails on changed numbers or structure."""

import io
import json
import shutil
import subprocess

import pytest

from hdkd.evaluation.evaluate import write_evaluation
from hdkd.report.build import build_report
from hdkd.report.check import DirTree, GitTree, Tolerance, check, check_reports, compare_json, compare_trees
from pipeline.check_reports import main as cli
from tests.helpers.bundles import bundle_with
from tests.helpers.git import commit_all
from tests.helpers.params import section


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    out = tmp_path_factory.mktemp("committed") / "reports"
    bundle = bundle_with()
    write_evaluation(bundle, out)
    build_report(bundle, out, section("report"))
    return out


@pytest.fixture
def fresh(tmp_path, committed):
    return shutil.copytree(committed, tmp_path / "fresh")


def edit(path, old, new):
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} must occur once in {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8", newline="\n")


def edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def differences(committed, fresh, **tol):
    return [str(d) for d in compare_trees(DirTree(committed), DirTree(fresh), Tolerance(**tol))]


def test_identical_reports_match(committed, fresh):
    assert differences(committed, fresh) == []


def test_changed_metric_fails_and_small_noise_passes(committed, fresh):
    edit_json(fresh / "metrics.json", lambda m: m["teacher"].update(accuracy=0.9004))  # |Δ| 4e-4 <= 9e-4
    assert differences(committed, fresh) == []
    edit_json(fresh / "metrics.json", lambda m: m["teacher"].update(accuracy=0.902))
    diffs = differences(committed, fresh)
    assert len(diffs) == 1
    assert diffs[0].startswith("[value] metrics.json: teacher.accuracy: committed 0.9 vs fresh 0.902 (tol 0.000901")
    assert differences(committed, fresh, rtol=1e-2) == []  # the tolerance is configurable


def test_changed_table_number(committed, fresh):
    # one unit in the last printed digit is rounding; a whole point is a change
    edit(fresh / "tables" / "main.md", "| Teacher | 3.949 | 5812.3 | 90.00 |", "| Teacher | 3.949 | 5812.3 | 90.01 |")
    assert differences(committed, fresh) == []
    edit(fresh / "tables" / "main.md", "| 90.01 |", "| 91.00 |")
    diffs = differences(committed, fresh)
    assert diffs == [
        "[value] tables/main.md: line 5, Accuracy (%): committed 90.00 vs fresh 91.00 "
        "(tol 0.1 = atol 1e-06 + rtol 0.001·|committed| + 0.01 rounding)"
    ]
    stream = io.StringIO()
    check_reports(DirTree(committed), DirTree(fresh), stream=stream)
    printed = stream.getvalue()
    assert "--- committed/tables/main.md\n+++ fresh/tables/main.md\n" in printed
    assert "\n-| Teacher | 3.949 | 5812.3 | 90.00 |" in printed and "\n+| Teacher | 3.949 | 5812.3 | 91.00 |" in printed
    assert printed.rstrip().endswith("1 difference(s)")


def test_what_git_ignores_in_the_fresh_reports_is_not_a_report_file(committed, fresh):
    # A DVC-cached output under reports/ (a training stage's MLflow run record) is never committed: a fresh run's
    # copy is no difference; a new file git would track is one.
    subprocess.run(["git", "init", "-q", str(fresh)], check=True)
    (fresh / "train").mkdir()
    (fresh / "train" / ".gitignore").write_text("/teacher.run.json\n")
    (fresh / "train" / "teacher.run.json").write_text('{"run_id": "0f1e"}')
    assert differences(committed, fresh) == []
    (fresh / "train" / "teacher.json").write_text('{"val_accuracy": 0.5}')
    assert differences(committed, fresh) == ["[structure] train/teacher.json: not in the committed reports"]


def test_every_number_of_a_table_cell_is_compared(committed, fresh):
    edit(fresh / "tables" / "main.md", "| 85.00 | [80.00, 90.00] |", "| 85.00 | [80.00, 99.00] |")
    diffs = differences(committed, fresh)
    assert len(diffs) == 1 and "committed 90.00 vs fresh 99.00" in diffs[0], diffs


def test_nan_matches_only_nan(committed, fresh, tmp_path):
    nan_committed = shutil.copytree(committed, tmp_path / "nan_committed")
    edit_json(nan_committed / "metrics.json", lambda m: m["teacher"].update(accuracy=float("nan")))
    edit_json(fresh / "metrics.json", lambda m: m["teacher"].update(accuracy=float("nan")))
    assert differences(nan_committed, fresh) == []
    assert len(differences(committed, fresh, rtol=1.0, atol=1e9)) == 1  # a number committed, NaN fresh
    assert len(differences(nan_committed, committed, rtol=1.0, atol=1e9)) == 1  # NaN committed, a number fresh


@pytest.mark.parametrize(
    "file, old, new, expected",
    [
        ("tables/main.csv", "Model,Params (M)", "Model,Params", "line 1 header: committed 'Params (M)'"),
        ("tables/main.csv", "HDKD,3.727", "HDKd,3.727", "line 4 row label: committed 'HDKD' vs fresh 'HDKd'"),
        ("tables/main.md", "| 85.00 | [80.00, 90.00] |", "| 85.00 | n/a |", "committed '[80.00, 90.00]' vs fresh 'n/a'"),
        ("tables/per_class.csv", "nv,20,", "nv,20,1,", "line 4: row of 11 cells committed vs row of 12 fresh"),
        ("plots/training.csv", "hdkd,3,0.001,", "hdkd,3,0.001,\nhdkd,4,0.001,", "10 lines committed vs 11 fresh"),
    ],
)
def test_changed_structure_fails_whatever_the_tolerance(committed, fresh, file, old, new, expected):
    edit(fresh / file, old, new)
    diffs = differences(committed, fresh, rtol=1.0, atol=1e9)
    assert len(diffs) == 1 and diffs[0].startswith(f"[structure] {file}:") and expected in diffs[0], diffs


def test_json_structure_and_files(committed, fresh):
    edit_json(fresh / "metrics.json", lambda m: m["hdkd"].update(brier=0.1))
    (fresh / "eval" / "student.json").unlink()
    (fresh / "tables" / "extra.csv").write_text("a\n")
    assert differences(committed, fresh) == [
        "[structure] eval/student.json: missing from the fresh reports",
        "[structure] tables/extra.csv: not in the committed reports",
        "[structure] metrics.json: hdkd: keys only in fresh: ['brier']",
    ]


@pytest.mark.parametrize("committed_list, fresh_list", [([1, 2, 3], [1, 2]), ([1, 2], [1, 2, 3])])
def test_a_list_of_another_length_fails_whichever_is_longer(committed_list, fresh_list):
    diffs = compare_json("x.json", {"v": committed_list}, {"v": fresh_list}, Tolerance(rtol=1.0, atol=1e9))
    assert [str(d) for d in diffs] == [
        f"[structure] x.json: v: {len(committed_list)} items committed vs {len(fresh_list)} fresh"]


def test_timing_and_provenance_are_not_compared(committed, fresh):
    edit_json(fresh / "metrics.json", lambda m: m["teacher"]["timing"].update(cpu_bs1_ms_per_image=80.0))
    edit_json(fresh / "bundle.json", lambda b: b.update(git_commit="f" * 40, dvc_exp_name="exp-x"))
    edit(fresh / "tables" / "efficiency.md", "| 40.000 | 25.0 |", "| 80.000 | 12.5 |")
    edit(fresh / "README.md", "0123456789abcdef0123456789abcdef01234567", "f" * 40)
    assert differences(committed, fresh) == []


def test_a_numerics_version_difference_is_named(committed, fresh, tmp_path):
    versions = {"torch": "2.14.1", "numpy": "2.3.5", "mkl": "2025.2", "onednn": "3.9.1"}
    base = shutil.copytree(committed, tmp_path / "committed")
    edit_json(base / "bundle.json", lambda b: b.update(numerics=versions))
    edit_json(fresh / "bundle.json", lambda b: b.update(numerics={**versions, "torch": "2.15.0", "mkl": None}))
    out = io.StringIO()
    found = check_reports(DirTree(base), DirTree(fresh), stream=out)
    assert "numerics versions differ (committed -> fresh): mkl 2025.2 -> None, torch 2.14.1 -> 2.15.0;" in out.getvalue()
    assert {d.message.split(":")[0] for d in found} >= {"numerics.torch"}
    edit_json(fresh / "bundle.json", lambda b: b.update(numerics=versions))
    out = io.StringIO()
    assert check_reports(DirTree(base), DirTree(fresh), stream=out) == [] and "versions differ" not in out.getvalue()


def test_exit_codes_from_main_and_cli(committed, fresh):
    assert check(fresh, committed, "HEAD", ".", "reports") == 0
    assert cli(["--committed", str(committed), "--fresh", str(fresh)]) == 0
    edit_json(fresh / "metrics.json", lambda m: m["hdkd"].update(f1_macro=0.5))
    assert check(fresh, committed, "HEAD", ".", "reports") == 1
    assert cli(["--committed", str(committed), "--fresh", str(fresh)]) == 1
    assert cli(["--committed", str(committed), "--fresh", str(fresh), "--ignore", "*f1_macro"]) == 0


def test_against_the_reports_of_a_git_revision(git_repo, committed):
    reports = shutil.copytree(committed, git_repo / "reports")
    commit_all(git_repo, "reports")
    tree = GitTree(git_repo, "HEAD")
    assert tree.files() == DirTree(reports).files()
    assert check(reports, None, "HEAD", git_repo, "reports") == 0
    edit(reports / "tables" / "main.csv", "Teacher,3.949,5812.3,90.00", "Teacher,3.949,5812.3,95.00")
    assert check(reports, None, "HEAD", git_repo, "reports") == 1
    assert cli(["--fresh", str(reports), "--repo", str(git_repo)]) == 1


def _rerun_with(fresh, change):
    """Fresh reports whose runs' accuracies are ``change(seed, accuracy)``, everything derived rebuilt."""
    bundle = bundle_with()
    for model in bundle["models"].values():
        for run in model["runs"]:
            run["evaluation"]["accuracy"] = change(run["seed"], run["evaluation"]["accuracy"])
    shutil.rmtree(fresh)
    write_evaluation(bundle, fresh)
    build_report(bundle, fresh, section("report"))


def test_statistical_mode_passes_seed_noise_and_names_its_test(committed, fresh):
    # every run moved by half a point, in a direction that changes with the seed: outside the exact
    # check's tolerance, well inside the seeds' spread (2.5 to 5 points)
    _rerun_with(fresh, lambda seed, acc: acc + (0.005 if seed % 2 else -0.005))
    assert differences(committed, fresh)  # the exact check fails
    out = io.StringIO()
    assert check_reports(DirTree(committed), DirTree(fresh), stream=out, mode="statistical") == []
    assert "statistically" in out.getvalue() and "Welch's t-test over the seeds" in out.getvalue()
    assert "alpha 0.01 (--statistical was given)" in out.getvalue()


def test_statistical_mode_fails_a_shift_beyond_the_seeds_spread(committed, fresh):
    _rerun_with(fresh, lambda seed, acc: acc - 0.2)
    diffs = [str(d) for d in check_reports(DirTree(committed), DirTree(fresh), stream=io.StringIO(),
                                           mode="statistical")]
    # the teacher at full data: 90, 87.5, 85 committed vs 70, 67.5, 65 fresh; Welch t = 9.80, df 4
    assert any(d.startswith("[value] bundle.json: teacher at fraction 1, accuracy: committed mean 0.8750 "
                            "(sd 0.0250, 3 seeds) vs fresh 0.6750 (sd 0.0250, 3 seeds): p = 0.000608 < 0.01")
               for d in diffs), diffs
    assert cli(["--committed", str(committed), "--fresh", str(fresh), "--statistical"]) == 1
    assert cli(["--committed", str(committed), "--fresh", str(committed), "--statistical", "--alpha", "0.05"]) == 0


def test_statistical_mode_still_compares_the_structure(committed, fresh):
    edit(fresh / "tables" / "main.md", "| Teacher |", "| Teacher (CNN) |")
    diffs = [str(d) for d in check_reports(DirTree(committed), DirTree(fresh), stream=io.StringIO(),
                                           mode="statistical")]
    assert len(diffs) == 1 and diffs[0].startswith("[structure] tables/main.md: line 5 row label"), diffs


def test_the_kind_of_comparison_follows_how_the_runs_were_made_and_is_said(committed, fresh):
    out = io.StringIO()
    check_reports(DirTree(committed), DirTree(fresh), stream=out)
    assert "exactly: every printed character of the tables and every pixel of the figures" in out.getvalue()
    assert "(both runs used the reproducible CPU numerics mode on the same CPU (x86_64)" in out.getvalue()
    # The fresh run without the mode: its seed noise, under the exact check a failure, passes statistically.
    bundle = bundle_with({"train": {"reproducible": False}})
    for model in bundle["models"].values():
        for run in model["runs"]:
            run["evaluation"]["accuracy"] += 0.005 if run["seed"] % 2 else -0.005
    shutil.rmtree(fresh)
    write_evaluation(bundle, fresh)
    build_report(bundle, fresh, section("report"))
    out = io.StringIO()
    differences = check_reports(DirTree(committed), DirTree(fresh), stream=out)
    assert "statistically" in out.getvalue() and "(the fresh run had train.reproducible off: " in out.getvalue()
    assert [d for d in differences if d.kind == "value"] == []
    assert check_reports(DirTree(committed), DirTree(fresh), stream=io.StringIO(), mode="exact")  # forced: fails


def check_auto(committed, fresh) -> tuple[list[str], str]:
    """``check_reports`` as CI runs it (the kind of comparison chosen from the bundles): differences, printout."""
    out = io.StringIO()
    return [str(d) for d in check_reports(DirTree(committed), DirTree(fresh), stream=out)], out.getvalue()


def edit_png(path, x=5, y=5):
    """One pixel of a figure changed, by one level of one channel: what no eye sees, and no check may miss."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        pixels = img.copy()
    value = list(pixels.getpixel((x, y)))
    value[0] = value[0] - 1 if value[0] else 1
    pixels.putpixel((x, y), tuple(value))
    pixels.save(path)


def on_cpu(bundle_path, device_name):
    """A results bundle whose runs were timed (so made) on a CPU called ``device_name``."""
    edit_json(bundle_path, lambda b: [t.update(device_name=device_name) for m in b["models"].values()
                                      for t in (m["efficiency"] or {}).get("timing", [])])


@pytest.mark.parametrize("file, old, new", [
    ("tables/main.md", "| Teacher | 3.949 | 5812.3 | 90.00 |", "| Teacher | 3.949 | 5812.3 | 90.01 |"),  # 90.00 -> 90.01 %
    ("tables/main.csv", "Student,3.725,", "Student,3.726,"),  # one unit of a 3-decimal column
    ("tables/metrics.md", "| HDKD | 65.00 | 75.00 | 0.9000 | 0.0625 |", "| HDKD | 65.00 | 75.00 | 0.9000 | 0.0626 |"),
])
def test_a_table_edited_in_its_last_printed_digit_fails_between_runs_of_the_same_cpu(committed, fresh, file, old, new):
    edit(fresh / file, old, new)
    diffs, printed = check_auto(committed, fresh)
    assert len(diffs) == 1 and diffs[0].startswith(f"[value] {file}: line "), diffs
    assert "exact" in printed and "the same CPU" in printed, printed


def test_a_figure_changed_in_one_pixel_fails_between_runs_of_the_same_cpu(committed, fresh):
    edit_png(fresh / "figures" / "per_class_f1.png")
    diffs, _ = check_auto(committed, fresh)
    assert len(diffs) == 1 and diffs[0].startswith("[value] figures/per_class_f1.png: 1 of "), diffs
    assert "pixels differ" in diffs[0]


def test_runs_of_the_same_cpu_still_ignore_timing_and_provenance(committed, fresh):
    edit_json(fresh / "metrics.json", lambda m: m["teacher"]["timing"].update(cpu_bs1_ms_per_image=80.0))
    edit_json(fresh / "bundle.json", lambda b: b.update(git_commit="f" * 40, dvc_exp_name="exp-x"))
    edit(fresh / "tables" / "efficiency.md", "| 40.000 | 25.0 |", "| 80.000 | 12.5 |")
    edit(fresh / "README.md", "0123456789abcdef0123456789abcdef01234567", "f" * 40)
    diffs, printed = check_auto(committed, fresh)
    assert diffs == [] and "exact" in printed


def test_across_cpus_numbers_are_within_tolerance_and_figures_by_presence(committed, fresh):
    on_cpu(fresh / "bundle.json", "arm64")  # the fresh reports come from another kind of CPU
    edit(fresh / "tables" / "main.md", "| Teacher | 3.949 | 5812.3 | 90.00 |", "| Teacher | 3.949 | 5812.3 | 90.01 |")
    edit_png(fresh / "figures" / "per_class_f1.png")
    diffs, printed = check_auto(committed, fresh)
    assert diffs == [], diffs
    assert "every number within rtol 0.001, atol 1e-06" in printed and "x86_64" in printed and "arm64" in printed
    edit(fresh / "tables" / "main.md", "| 90.01 |", "| 91.00 |")
    assert len(check_auto(committed, fresh)[0]) == 1
