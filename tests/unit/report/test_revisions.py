"""Finding a run's results bundle by commit or DVC experiment (MLflow first, then git), and rebuilding
its report byte-identically without retraining."""

import json
import subprocess
from pathlib import Path

import pytest

from hdkd.infra.io import write_json
from hdkd.infra.provenance import git_state
from hdkd.report.build import build_report
from hdkd.report.revisions import COMMIT_TAG, EXP_TAG, RevisionNotFound, bundle_for_revision, export_for_revision
from pipeline.report import main as report_cli
from pipeline.revision_report import main as revision_report_cli
from tests.helpers.bundles import bundle_with, log_run
from tests.helpers.git import commit_all, run_git
from tests.helpers.params import PARAMS_YAML, section

REPORT = section("report")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A git repo (commit A holds reports/bundle.json; commit B changes code) and an MLflow store with
    runs of B (a plain `dvc repro` run, a newer experiment run, a newer run without a bundle), of a
    commit this clone does not have, and of a commit with two experiments only."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("regen")
    repo = tmp / "repo"
    repo.mkdir()
    run_git(repo, "init", "-q", "-b", "main")
    (repo / "code.py").write_text("x = 1\n")
    bundle_a = bundle_with(shift=-0.1, git_commit="a" * 40)
    write_json(repo / "reports" / "bundle.json", bundle_a)
    commit_a = commit_all(repo, "Evaluate: reports of A")
    (repo / "code.py").write_text("x = 2\n")
    commit_b = commit_all(repo, "Change code")
    # a DVC experiment saved in git only, as `dvc exp` lays refs out: refs/exps/<baseline>/<name>
    run_git(repo, "update-ref", f"refs/exps/{commit_b[:2]}/{commit_b[2:]}/exp-git-only", commit_a)

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("hdkd-toy", artifact_location=str(tmp / "artifacts"))
    bundle_b = bundle_with(shift=0.02, git_commit=commit_b)
    bundle_exp = bundle_with({"distill": {"lambda": 1.0}}, git_commit=commit_b, dvc_exp_name="exp-lambda-1")
    bundle_other = bundle_with(shift=-0.05, git_commit="f" * 40)
    log_run(client, eid, {COMMIT_TAG: commit_b}, 1000, bundle_b, tmp)
    log_run(client, eid, {COMMIT_TAG: commit_b, EXP_TAG: "exp-lambda-1"}, 2000, bundle_exp, tmp, "evaluate")
    log_run(client, eid, {COMMIT_TAG: commit_b}, 3000)  # e.g. a training stage: no bundle
    log_run(client, eid, {COMMIT_TAG: "f" * 40}, 4000, bundle_other, tmp)
    log_run(client, eid, {COMMIT_TAG: commit_a, EXP_TAG: "exp-on-a"}, 4500, bundle_exp, tmp)  # A's experiment
    for name in ("exp-a", "exp-b"):  # a commit with experiment runs only
        log_run(client, eid, {COMMIT_TAG: "e" * 40, EXP_TAG: name}, 5000, bundle_other, tmp)
    return {"repo": repo, "uri": uri, "A": commit_a, "B": commit_b, "bundle_a": bundle_a, "bundle_b": bundle_b,
            "bundle_exp": bundle_exp, "bundle_other": bundle_other, "tmp": tmp}


def test_commit_found_by_mlflow_tag(store):
    found = bundle_for_revision(store["B"][:8], store["uri"], store["repo"])
    # the plain run wins over the newer experiment run of the same commit and the run without a bundle
    assert found == store["bundle_b"]
    assert bundle_for_revision(store["B"], store["uri"], store["repo"]) == store["bundle_b"]


def test_experiment_found_by_name_at_any_artifact_depth(store):
    assert bundle_for_revision("exp-lambda-1", store["uri"], store["repo"]) == store["bundle_exp"]


def test_commit_unknown_to_git_found_by_hash_prefix(store):
    assert bundle_for_revision("ffffffff", store["uri"], store["repo"]) == store["bundle_other"]


def test_a_commit_with_several_experiments_only_is_ambiguous(store):
    with pytest.raises(RevisionNotFound, match=r"only has DVC experiment runs in MLflow \(exp-a, exp-b\)"):
        bundle_for_revision("eeeeeee", store["uri"], store["repo"])
    assert bundle_for_revision("exp-b", store["uri"], store["repo"]) == store["bundle_other"]


def test_git_fallback_for_commits_without_plain_runs(store):
    # A's only run is an experiment: it stands for its name, A for the bundle committed there
    assert bundle_for_revision(store["A"][:7], store["uri"], store["repo"]) == store["bundle_a"]
    assert bundle_for_revision("exp-on-a", store["uri"], store["repo"]) == store["bundle_exp"]
    assert bundle_for_revision("HEAD~1", store["uri"], store["repo"]) == store["bundle_a"]
    missing_db = store["tmp"] / "none.db"
    assert bundle_for_revision(store["A"], f"sqlite:///{missing_db}", store["repo"]) == store["bundle_a"]
    assert not missing_db.exists()  # looking up never creates an empty tracking store
    assert bundle_for_revision("exp-git-only", store["uri"], store["repo"]) == store["bundle_a"]


def test_nothing_found_lists_available_revisions(store):
    with pytest.raises(RevisionNotFound) as err:
        bundle_for_revision("deadbeef", store["uri"], store["repo"])
    message = str(err.value)
    assert "no results bundle found for revision 'deadbeef'" in message
    assert f"    {store['B'][:12]}\n" in message
    assert f"    {store['B'][:12]} (experiment exp-lambda-1)\n" in message
    assert "    ffffffffffff\n" in message
    short_a = run_git(store["repo"], "rev-parse", "--short", store["A"])
    assert f"    {short_a} Evaluate: reports of A" in message
    assert "DVC experiments (refs/exps): exp-git-only" in message
    with pytest.raises(RevisionNotFound, match="MLflow: no tracking store at None"):
        bundle_for_revision("deadbeef", None, store["repo"])


def table_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "tables").iterdir())}


def test_rebuild_from_a_revision_is_byte_identical(store, tmp_path):
    ablation = store["bundle_exp"]
    build_report(store["bundle_b"], tmp_path / "direct", REPORT, [ablation])
    regenerated = bundle_for_revision(store["B"][:10], store["uri"], store["repo"])
    build_report(regenerated, tmp_path / "regenerated", REPORT, [ablation])
    direct = table_bytes(tmp_path / "direct")
    assert "ablation_lambda.md" in direct
    assert table_bytes(tmp_path / "regenerated") == direct

    revision_report_cli([store["B"][:10], "--ablation", "exp-lambda-1", "--out", str(tmp_path / "cli"),
                "--tracking-uri", store["uri"], "--repo", str(store["repo"]),
                "--params", str(PARAMS_YAML)])
    assert table_bytes(tmp_path / "cli") == direct
    assert (tmp_path / "cli" / "README.md").read_bytes() == (tmp_path / "direct" / "README.md").read_bytes()


def test_report_cli_from_a_bundle_file(store, tmp_path):
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(store["bundle_a"]))
    report_cli(["--bundle", str(path), "--out", str(tmp_path / "out"), "--params", str(PARAMS_YAML),
                "--ablations-dir", str(tmp_path / "no-ablations")])  # not the repository's committed ones
    build_report(store["bundle_a"], tmp_path / "direct", REPORT)
    assert table_bytes(tmp_path / "out") == table_bytes(tmp_path / "direct")


def test_git_state_ignores_pipeline_outputs(git_repo, tmp_path, monkeypatch):
    (git_repo / "code.py").write_text("x = 1\n")
    (git_repo / "reports").mkdir()
    (git_repo / "reports" / "metrics.json").write_text("{}\n")
    head = commit_all(git_repo, "c")
    assert git_state(git_repo) == {"git_commit": head, "git_dirty": False}
    (git_repo / "reports" / "metrics.json").write_text('{"a": 1}\n')
    assert git_state(git_repo)["git_dirty"] is False  # `dvc repro` rewrites its outputs
    (git_repo / "params.yaml").write_text("seed: 1\n")
    commit_all(git_repo, "params")
    (git_repo / "params.yaml").write_text("seed: 2\n")
    assert git_state(git_repo)["git_dirty"] is False  # `dvc exp run -S seed=2`: recorded as params, not code
    (git_repo / "code.py").write_text("x = 2\n")
    assert git_state(git_repo)["git_dirty"] is True
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path counts
    assert git_state(outside) == {"git_commit": None, "git_dirty": None}


# ------------------------------------------------------------------- revisions with ablation bundles
@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory):
    """Reports as the pipeline writes them, with ablation bundles in reports/ablations: commit C, and a
    DVC experiment committed on its ref (refs/exps/...). No bundle.json is committed, so the main
    bundles can only come from their evaluate runs in MLflow. The ablations were run against an earlier
    default (train.grad_clip 1), their reference.json: grouped against the main run, they would be no ablation."""
    from mlflow.tracking import MlflowClient

    from hdkd.report.ablations import ablation_labels, write_ablations

    tmp = tmp_path_factory.mktemp("pipeline")
    repo = tmp / "repo"
    repo.mkdir()
    run_git(repo, "init", "-q", "-b", "main")
    earlier = {"train": {"grad_clip": 1.0}}
    reference = bundle_with(earlier, shift=0.03, git_commit="e" * 40)
    ablations = [bundle_with(earlier | {"distill": {"lambda": 1.0}}, shift=-0.1, dvc_exp_name="abl-lambda-1"),
                 bundle_with(earlier | {"model": {"stem_stride": 4}}, shift=-0.2)]
    write_ablations(ablation_labels(ablations), repo / "reports" / "ablations", reference)
    plain = bundle_with(shift=0.01)
    build_report(plain, repo / "reports", REPORT, ablations, ablation_reference=reference)
    commit = commit_all(repo, "Reports with ablations")
    exp = bundle_with(shift=0.02, git_commit=commit, dvc_exp_name="exp-again")  # `dvc exp run` of the same params
    build_report(exp, repo / "reports", REPORT, ablations, ablation_reference=reference)
    exp_commit = commit_all(repo, "exp-again")
    run_git(repo, "update-ref", f"refs/exps/{commit[:2]}/{commit[2:]}/exp-again", exp_commit)
    run_git(repo, "reset", "-q", "--hard", commit)

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment("hdkd-synthetic", artifact_location=str(tmp / "artifacts"))
    log_run(client, eid, {COMMIT_TAG: commit}, 1000, plain, tmp)
    log_run(client, eid, {COMMIT_TAG: commit, EXP_TAG: "exp-again"}, 2000, exp, tmp, "evaluate")
    return {"repo": repo, "uri": uri, "commit": commit, "exp_commit": exp_commit}


def committed_report(repo, rev):
    names = run_git(repo, "ls-tree", "-r", "--name-only", rev, "reports/tables", "reports/README.md").split()
    return {Path(n).name: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=repo, capture_output=True,
                                         check=True).stdout for n in names}


def rebuilt_report(out):
    return {p.name: p.read_bytes() for p in [*sorted((out / "tables").iterdir()), out / "README.md"]}


@pytest.mark.parametrize("rev, source", [("commit", "commit"), ("exp-again", "exp_commit")])
def test_revision_rebuilt_with_its_committed_ablations(pipeline_repo, tmp_path, monkeypatch, rev, source):
    repo = pipeline_repo["repo"]
    rev = pipeline_repo["commit"][:9] if rev == "commit" else rev
    monkeypatch.chdir(tmp_path)
    revision_report_cli([rev, "--tracking-uri", pipeline_repo["uri"], "--repo", str(repo),
                "--params", str(PARAMS_YAML)])
    committed = committed_report(repo, pipeline_repo[source])
    assert {"ablation_lambda.md", "ablation_stem_stride.csv"} <= set(committed)  # only against reference.json
    assert b"were run at an earlier default than this report's run, which differs in train.grad_clip" in committed[
        "README.md"]
    assert rebuilt_report(tmp_path / "runs" / rev) == committed  # default --out: runs/<rev>, not reports/
    assert (tmp_path / "runs" / rev / "figures" / "data_efficiency.png").is_file()


def test_unknown_revision_is_a_clear_error_listing_the_available_ones(pipeline_repo, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        revision_report_cli(["exp-nope", "--tracking-uri", pipeline_repo["uri"], "--repo", str(pipeline_repo["repo"]),
                    "--out", str(tmp_path / "out"), "--params", str(PARAMS_YAML)])
    message = str(exit_info.value.code)
    assert message.startswith("error: no results bundle found for revision 'exp-nope'. Available:")
    commit = pipeline_repo["commit"]
    assert f"    {commit[:12]}\n    {commit[:12]} (experiment exp-again)\n" in message
    assert "DVC experiments (refs/exps): exp-again" in message
    assert not (tmp_path / "out").exists()


def test_a_revision_brings_its_export_report_for_the_efficiency_table(git_repo):
    (git_repo / "code.py").write_text("x = 1\n")
    without = commit_all(git_repo, "no export yet")
    (git_repo / "reports").mkdir()
    (git_repo / "reports" / "export.json").write_text('{"models": {}}\n')
    with_export = commit_all(git_repo, "exported")
    assert export_for_revision(with_export, git_repo) == {"models": {}}
    assert export_for_revision(without, git_repo) is None
    assert export_for_revision("no-such-revision", git_repo) is None


def test_a_revision_is_reported_with_its_committed_report_settings(git_repo):
    # report.comparisons changed after the evaluation: the report stage ran with the committed params.yaml,
    # so a rebuild must too, not with the bundle's params (nor today's).
    from hdkd.report.stage import revision_report_config

    bundle = bundle_with()
    params = json.loads(json.dumps(bundle["params"]))
    params["report"]["comparisons"] = [["hdkd", "student"]]
    (git_repo / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    rev = commit_all(git_repo, "params")
    fallback = section("report")
    assert revision_report_config(bundle, fallback, rev, git_repo).comparisons == [("hdkd", "student")]
    assert revision_report_config(bundle, fallback).comparisons == [tuple(p) for p in
                                                                     bundle["params"]["report"]["comparisons"]]
    (git_repo / "params.yaml").write_text("report: {dpi: oops}\n")  # an unreadable one: the bundle's
    rev = commit_all(git_repo, "broken")
    assert revision_report_config(bundle, fallback, rev, git_repo) == revision_report_config(bundle, fallback)
