"""The study profile: its overlay is valid and what it promises, its worktree runs the committed code with the
overlay applied (kept at the same commit, so an interrupted study resumes), and its report is rebuilt from the
bundle it leaves, with its own report settings."""

from __future__ import annotations

import shutil

import yaml

from hdkd.config import apply_overlay, load_params
from hdkd.evidence.bundle import load_bundle
from hdkd.infra.io import write_json
from hdkd.report.stage import build_study_report
from hdkd.report.study import prepare_worktree
from tests.helpers import ROOT
from tests.helpers.git import commit_all, run_git


def test_the_study_overlay_is_valid_and_sized_as_promised(tmp_path):
    merged = tmp_path / "params.yaml"
    merged.write_text(apply_overlay(ROOT / "params.yaml", ROOT / "params" / "study.yaml"))
    params = load_params(merged)
    assert params.seeds == [0, 1, 2, 3, 4] and params.fractions == [0.01, 1.0]  # data is scarce at 1 %
    assert params.baseline_fractions == params.fractions  # every model at every fraction
    assert params.train.budget == "steps"  # every fraction at the full-data run's optimizer steps
    assert params.train.reproducible  # its bundle is rebuilt byte for byte by check_reports
    # Sizes are the data's and the steps', the same for every model: no model's recipe or capacity changes.
    default = load_params(ROOT / "params.yaml")
    assert params.model == default.model and params.baselines.keys() == default.baselines.keys()
    assert all(params.baselines[k].kwargs == default.baselines[k].kwargs for k in params.baselines)


def test_the_worktree_runs_head_with_the_overlay_and_is_kept_at_the_same_commit(git_repo, tmp_path):
    shutil.copy(ROOT / "params.yaml", git_repo / "params.yaml")
    head = commit_all(git_repo, "one")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("seeds: [7]\n")
    work = git_repo / ".dvc" / "tmp" / "study"
    assert prepare_worktree(git_repo, work, overlay) == head
    assert yaml.safe_load((work / "params.yaml").read_text())["seeds"] == [7]
    assert "# HDKD pipeline parameters" in (work / "params.yaml").read_text()  # params.yaml's comments kept
    (work / "unfinished-run").write_text("x")  # what an interrupted study left
    prepare_worktree(git_repo, work, overlay)
    assert (work / "unfinished-run").exists()  # same commit: resumed, not started afresh
    (git_repo / "params.yaml").write_text((git_repo / "params.yaml").read_text() + "\n")
    head2 = commit_all(git_repo, "two")
    assert prepare_worktree(git_repo, work, overlay) == head2 != head
    assert not (work / "unfinished-run").exists()  # another commit: a fresh worktree
    assert run_git(work, "rev-parse", "HEAD") == head2


def test_the_study_report_is_built_from_its_bundle_with_its_own_settings(bundle, tmp_path):
    bundle["params"]["report"]["comparisons"] = [["hdkd", "teacher"]]  # the study's own, not params.yaml's
    write_json(tmp_path / "bundle.json", bundle)
    written = build_study_report(tmp_path)
    assert tmp_path / "README.md" in written and (tmp_path / "tables" / "data_efficiency.csv").is_file()
    significance = (tmp_path / "tables" / "significance.csv").read_text()
    assert "hdkd vs teacher" in significance and "hdkd vs student" not in significance
    assert load_bundle(tmp_path / "bundle.json") == bundle  # read, never rewritten
