import logging
import subprocess
import time

import pytest

from hdkd.config import parse_params
from hdkd.tracking import Tracker, repo_root, resolve_tracking_uri
from tests.data_fixtures import refused_url

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def params(store, **tracking):
    return parse_params({"tracking": {"uri": store, **tracking}})


def test_stage_run_carries_params_tags_metrics_and_artifacts(store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    p = params(store)
    (tmp_path / "note.txt").write_text("hello")
    with Tracker(p.tracking, p, "train_teacher") as tracker:
        tracker.log_metrics({"val_accuracy": 0.5, "train_loss": 1.0}, step=1)
        tracker.log_metrics({"val_accuracy": 0.75, "train_loss": 0.5}, step=2)
        tracker.log_artifact(tmp_path / "note.txt")
        run_id = tracker.run_id
    client = MlflowClient(store)
    run = client.get_run(run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run.info.status == "FINISHED"
    assert run.data.tags["hdkd.git_commit"] == head
    assert run.data.tags["hdkd.git_dirty"] in ("true", "false")
    assert run.data.tags["hdkd.params_hash"] == p.digest()
    assert run.data.tags["hdkd.dvc_exp_name"] == "exp-test"
    assert run.data.tags["hdkd.stage"] == "train_teacher"
    assert "hdkd.env.torch" in run.data.tags
    assert run.data.params["distill.alpha"] == "0.5" and run.data.params["data.dataset"] == "synthetic"
    history = client.get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"note.txt", "params.json"} <= artifacts
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "hdkd-synthetic"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["hdkd.stage"] == "pipeline" and parent.info.run_name == "exp-test"


def test_stages_of_one_pipeline_share_a_parent(store, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    p = params(store, experiment="shared-parent")
    with Tracker(p.tracking, p, "train_teacher") as a:
        pass
    with Tracker(p.tracking, p, "train_student") as b:
        pass
    other = parse_params({"tracking": {"uri": store, "experiment": "shared-parent"}, "distill": {
        "epochs": 3, "optimizer": "adamw", "lr": 1e-3, "alpha": 0.9}})
    with Tracker(other.tracking, other, "distill") as c:
        pass
    assert a.parent_run_id == b.parent_run_id != c.parent_run_id


def test_an_interrupted_run_is_continued_not_duplicated(store):
    p = params(store, experiment="resume")
    first = Tracker(p.tracking, p, "distill")
    first.__enter__()
    first.log_metrics({"val_accuracy": 0.1}, step=1)
    run_id = first.run_id  # the process dies here: no __exit__
    with Tracker(p.tracking, p, "distill", resume_run_id=run_id) as second:
        second.log_metrics({"val_accuracy": 0.2}, step=2)
    client = MlflowClient(store)
    assert second.run_id == run_id
    assert [m.value for m in client.get_metric_history(run_id, "val_accuracy")] == [0.1, 0.2]
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                              filter_string="tags.`hdkd.stage` = 'distill'")
    assert len(runs) == 1


def test_tracking_failure_never_raises(tmp_path, caplog):
    (tmp_path / "not-a-dir").write_text("x")
    p = params(f"sqlite:///{tmp_path / 'not-a-dir' / 'mlflow.db'}")
    with caplog.at_level(logging.WARNING):
        with Tracker(p.tracking, p, "train_teacher") as tracker:
            tracker.log_metrics({"a": 1.0}, step=1)
            tracker.log_artifact(tmp_path / "not-a-dir")
    assert not tracker.enabled and "continuing without tracking" in caplog.text


def test_an_unreachable_tracking_server_is_given_up_at_once(caplog):
    p = params(refused_url())  # a local port where nothing listens: a tracking server that is down
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        with Tracker(p.tracking, p, "train_teacher") as tracker:
            tracker.log_metrics({"a": 1.0}, step=1)
    assert time.monotonic() - start < 30  # MLflow's own retries would take about four minutes
    assert not tracker.enabled and "is unreachable" in caplog.text


def test_disabled_tracking_does_nothing(tmp_path):
    p = params(f"sqlite:///{tmp_path / 'x.db'}", enabled=False)
    with Tracker(p.tracking, p, "train_teacher") as tracker:
        tracker.log_metrics({"a": 1.0})
    assert tracker.run_id is None and not (tmp_path / "x.db").exists()


def test_queued_experiments_resolve_to_the_real_repo(tmp_path, monkeypatch):
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert repo_root(inner) == tmp_path / "repo"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path / "repo") == f"sqlite:///{tmp_path}/repo/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == "sqlite:////elsewhere/m.db"
