"""DVC experiments and ablations: runs collected from MLflow into reports/ablations, the report built
from them, and (slow) a real `dvc exp run` whose MLflow runs and rebuilt tables are checked."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient  # noqa: E402

from hdkd.report.ablations import ablation_labels, collect_ablations
from hdkd.report.build import build_report
from hdkd.report.revisions import git_ref
from hdkd.roster import roster
from pipeline.ablations import main as ablations_cli
from pipeline.report import main as report_cli
from tests.helpers import ROOT as REPO  # noqa: E402
from tests.helpers.bundles import bundle_with, log_run
from tests.helpers.git import GIT_ENV, commit_all, run_git
from tests.helpers.params import PARAMS, PARAMS_YAML, section

EXPERIMENT = "hdkd-synthetic"  # bundle_with() keeps params.yaml's data.dataset: synthetic


def evaluate_tags(bundle, stage="evaluate"):
    return {"hdkd.stage": stage, "hdkd.params_hash": bundle["params_hash"]}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """An MLflow store with evaluate runs of a reference and of other runs, some of them ablations."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))
    other_eid = client.create_experiment("hdkd-other", artifact_location=str(tmp_path / "artifacts-other"))
    b = {
        "reference": bundle_with(),
        "lambda_old": bundle_with({"distill": {"lambda": 1.0}}, shift=-0.2, dvc_exp_name="abl-lambda-1"),
        "lambda": bundle_with({"distill": {"lambda": 1.0}}, shift=-0.1, dvc_exp_name="abl-lambda-1"),
        "alpha_tau": bundle_with({"distill": {"alpha": 0.9, "tau": 2.0}}, dvc_exp_name="abl alpha/tau"),
        "two_stages": bundle_with({"distill": {"stages": [2, 3]}}, shift=-0.05),  # no experiment: labelled by hash
        "two_groups": bundle_with({"distill": {"lambda": 1.0, "alpha": 0.9}}, dvc_exp_name="abl-mixed"),
        "block": bundle_with({"model": {"block": "mbconv"}}, shift=-0.01),
        "stages": bundle_with({"distill": {"stages": [3]}}),
        "stride": bundle_with({"model": {"stem_stride": 4}}),
    }
    for t, name in enumerate(("reference", "lambda_old", "lambda", "alpha_tau", "two_stages", "two_groups", "block")):
        log_run(client, eid, evaluate_tags(b[name]), 1000 * (t + 1), b[name], tmp_path, "evaluate" if t % 2 else None)
    log_run(client, eid, evaluate_tags(b["block"]), 9000)  # newest of its params, but failed before the bundle
    log_run(client, eid, evaluate_tags(b["stages"], "train_hdkd"), 9000, b["stages"], tmp_path)  # not an evaluate run
    log_run(client, other_eid, evaluate_tags(b["stride"]), 9000, b["stride"], tmp_path)  # another experiment
    # a run of an older pipeline, kept in the store across an upgrade: its bundle has another schema
    b["old_schema"] = bundle_with({"distill": {"lambda": 5.0}}, dvc_exp_name="abl-lambda-5") | {"schema_version": 1}
    log_run(client, eid, evaluate_tags(b["old_schema"]) | {"hdkd.dvc_exp_name": "abl-lambda-5"}, 8000,
            b["old_schema"], tmp_path)
    return uri, b


def test_collect_keeps_the_newest_run_of_each_one_ablation_params(tracked, tmp_path):
    uri, b = tracked
    out = tmp_path / "ablations"
    out.mkdir()
    (out / "README.md").write_text("kept\n")
    (out / "abl-gone.json").write_text("{}\n")  # from an earlier collection: stale
    done = collect_ablations(b["reference"], uri, EXPERIMENT, out)
    expected = {"abl-lambda-1": b["lambda"], "abl-alpha-tau": b["alpha_tau"], b["block"]["params_hash"][:12]: b["block"],
                b["two_stages"]["params_hash"][:12]: b["two_stages"]}
    # with the bundle they were grouped against, which the ablation tables compare them with
    expected["reference"] = b["reference"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", *(f"{k}.json" for k in expected)])
    for label, bundle in expected.items():
        assert json.loads((out / f"{label}.json").read_text()) == bundle
    assert done.removed == [out / "abl-gone.json"]
    old = [(s, why) for s, why in done.skipped if s["params_hash"] == b["old_schema"]["params_hash"]]
    assert len(old) == 1 and old[0][0]["dvc_exp_name"] == "abl-lambda-5"
    assert re.fullmatch(r"MLflow run \w+: results bundle schema_version 1 is not supported \(expected 2\)", old[0][1])
    assert sorted((s["params_hash"], why) for s, why in done.skipped if (s, why) not in old) == sorted([
        (b["reference"]["params_hash"], "same results params as the reference"),
        (b["two_groups"]["params_hash"], "differs in distill.alpha, distill.lambda: not one ablation"),
    ])


def test_collecting_from_an_empty_store_leaves_the_ablations_alone(tmp_path):
    kept = tmp_path / "ablations" / "abl-lambda-1.json"
    kept.parent.mkdir()
    kept.write_text("{}\n")
    args = ["collect", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--ablations-dir",
            str(kept.parent), "--bundle", str(tmp_path / "bundle.json"), "--params", str(PARAMS_YAML)]
    (tmp_path / "bundle.json").write_text(json.dumps(bundle_with()))
    with pytest.raises(SystemExit, match="no evaluate run with a results bundle in MLflow experiment 'hdkd-synthetic'"):
        ablations_cli(args)
    assert kept.read_text() == "{}\n" and not (tmp_path / "none.db").exists()


def test_labels_are_experiment_names_made_unique_by_hash():
    a = bundle_with({"distill": {"lambda": 1.0}}, dvc_exp_name="exp-x")
    c = bundle_with({"distill": {"lambda": 0.0}}, dvc_exp_name="exp-x")  # same name, another baseline
    d = bundle_with({"distill": {"alpha": 0.1}})
    assert ablation_labels([a, c, d]) == {f"exp-x-{a['params_hash'][:12]}": a, f"exp-x-{c['params_hash'][:12]}": c,
                                          d["params_hash"][:12]: d}
    named_reference = bundle_with({"distill": {"tau": 2.0}}, dvc_exp_name="reference")  # reference.json is taken
    assert ablation_labels([named_reference]) == {f"reference-{named_reference['params_hash'][:12]}": named_reference}


def test_report_uses_every_collected_ablation(tracked, tmp_path):
    uri, b = tracked
    bundle_file, ablations_dir = tmp_path / "bundle.json", tmp_path / "ablations"
    bundle_file.write_text(json.dumps(b["reference"]))
    common = ["--bundle", str(bundle_file), "--ablations-dir", str(ablations_dir), "--params", str(PARAMS_YAML)]
    ablations_cli(["collect", "--tracking-uri", uri, *common])
    report_cli(["--out", str(tmp_path / "cli"), *common])
    build_report(b["reference"], tmp_path / "direct", section("report"),
                 [b[k] for k in ("lambda", "alpha_tau", "two_stages", "block")], ablation_reference=b["reference"])
    tables = sorted(p.name for p in (tmp_path / "cli" / "tables").iterdir())
    assert [t for t in tables if t.startswith("ablation_")] == [
        f"ablation_{name}.{ext}" for name in ("alpha_tau", "block", "lambda", "stages") for ext in ("csv", "md")]
    assert (tmp_path / "cli" / "figures" / "data_efficiency.png").is_file()
    for path in sorted((tmp_path / "direct").rglob("*.*")):
        assert (tmp_path / "cli" / path.relative_to(tmp_path / "direct")).read_bytes() == path.read_bytes(), path.name


# ------------------------------------------------------------------------------------- slow: DVC
SHRUNK = ("seeds=[0, 1]", "fractions=[1.0]", "data.synthetic.num_images=300", "data.image_size=32", "teacher.epochs=1",
          "student.epochs=2", "baselines.vit.optim.warmup_epochs=1",  # the ViT's warmup fits the shrunk epochs
          "distill.epochs=2", "evaluate.bootstrap=20", "evaluate.latency_iters=1", "evaluate.latency_warmup=0",
          "evaluate.latency_batch_sizes=[1]")


def copy_project(dst: Path) -> str:
    """This checkout's files (tracked, and untracked but not ignored) committed in a new git repo."""
    listing = run_git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in sorted(set(listing.split("\0")) - {""}):
        if (REPO / name).is_file():  # a deleted tracked file is listed too
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    run_git(dst, "init", "-q", "-b", "main")
    for key, value in (("user.name", "t"), ("user.email", "t@t")):  # DVC commits the experiment itself
        run_git(dst, "config", key, value)
    return commit_all(dst, "baseline")


def dvc_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    return env | GIT_ENV | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                            "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site")}


@pytest.mark.slow
def test_dvc_experiment_is_tracked_and_its_report_rebuilt(tmp_path):
    repo = tmp_path / "repo"
    baseline = copy_project(repo)
    env = dvc_env(tmp_path)

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    run("dvc", "exp", "run", "-S", "distill.alpha=0.5", *(arg for kv in SHRUNK for arg in ("-S", kv)))
    name = run("dvc", "exp", "list", "--name-only").split()[0]
    shown = json.loads(run("dvc", "exp", "show", "--json"))
    exps = [e for row in shown for e in row.get("experiments") or [] if e.get("name") == name]
    assert len(exps) == 1, shown
    assert json.loads(run("dvc", "metrics", "diff", "--json"))["reports/metrics.json"]  # the experiment vs HEAD

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                              f"tags.`hdkd.dvc_exp_name` = '{name}'")
    assert {r.data.tags["hdkd.stage"] for r in runs} == {"pipeline", "evaluate", *(m.stage for m in roster(PARAMS))}
    assert {r.data.tags["hdkd.git_commit"] for r in runs} == {baseline}
    assert {r.data.tags["hdkd.git_dirty"] for r in runs} == {"false"}  # -S edits params.yaml, not code

    run(sys.executable, "-m", "pipeline.revision_report", name)
    ref = git_ref(name, repo)
    tables = run_git(repo, "ls-tree", "--name-only", ref, "reports/tables/").split()
    assert "reports/tables/main.md" in tables
    for path in tables:
        rebuilt = (repo / "runs" / name / "tables" / Path(path).name).read_bytes()
        assert rebuilt == subprocess.run(["git", "show", f"{ref}:{path}"], cwd=repo, capture_output=True,
                                         check=True).stdout, path
