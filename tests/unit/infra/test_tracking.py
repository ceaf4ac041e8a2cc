import logging
import multiprocessing
import subprocess
import time
from pathlib import Path

import mlflow  # a dependency: never skipped for want of it
import pytest
from mlflow.tracking import MlflowClient  # noqa: E402

from hdkd.infra import numerics
from hdkd.infra.mlflow_store import resolve_tracking_uri, retry_transient
from hdkd.infra.provenance import repo_root
from hdkd.infra.tracking import Tracker
from tests.helpers.data import refused_url
from tests.helpers.params import make_params


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def params(store, **tracking):
    return make_params({"tracking": {"uri": store, **tracking}})


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
    assert run.data.tags["hdkd.git_commit"] == run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["hdkd.git_dirty"] in ("true", "false")
    assert run.data.tags["hdkd.params_hash"] == p.digest()
    assert run.data.tags["hdkd.dvc_exp_name"] == "exp-test"
    assert run.data.tags["hdkd.stage"] == "train_teacher"
    versions = numerics.numerics_versions()  # the versions that decide the numbers, MKL and oneDNN included
    assert {k: run.data.tags[f"hdkd.env.{k}"] for k in versions} == versions and {"mkl", "onednn"} <= versions.keys()
    assert run.data.tags["hdkd.env.reproducible_numerics"] in ("true", "false")
    assert sorted(run.data.params) == sorted(p.flat())  # every resolved param, not a sample
    assert run.data.params["distill.alpha"] == "0.5" and run.data.params["data.dataset"] == "synthetic"
    history = client.get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"note.txt", "params.json"} <= artifacts
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "hdkd-synthetic"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["hdkd.stage"] == "pipeline" and parent.info.run_name == "exp-test"
    assert parent.data.params == run.data.params and parent.data.tags["hdkd.git_commit"] == head


def test_stages_of_one_pipeline_share_a_parent(store, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    p = params(store, experiment="shared-parent")
    with Tracker(p.tracking, p, "train_teacher") as a:
        pass
    with Tracker(p.tracking, p, "train_student") as b:
        pass
    other = make_params({"tracking": {"uri": store, "experiment": "shared-parent"}, "distill": {
        "epochs": 3, "optimizer": "adamw", "lr": 1e-3, "alpha": 0.9}})
    with Tracker(other.tracking, other, "train_hdkd") as c:
        pass
    assert a.parent_run_id == b.parent_run_id != c.parent_run_id


def test_an_interrupted_run_is_continued_not_duplicated(store):
    p = params(store, experiment="resume")
    first = Tracker(p.tracking, p, "train_hdkd")
    first.__enter__()
    first.log_metrics({"val_accuracy": 0.1}, step=1)
    run_id = first.run_id  # the process dies here: no __exit__
    with Tracker(p.tracking, p, "train_hdkd", resume_run_id=run_id) as second:
        second.log_metrics({"val_accuracy": 0.2}, step=2)
    client = MlflowClient(store)
    assert second.run_id == run_id
    assert [m.value for m in client.get_metric_history(run_id, "val_accuracy")] == [0.1, 0.2]
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                              filter_string="tags.`hdkd.stage` = 'train_hdkd'")
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


def test_a_tracking_server_that_never_answers_is_given_up_within_seconds(caplog):
    from tests.helpers.net import finished_within, silent_server

    def stage(p):  # what a training stage does: the parent run first, then a stage run
        parent = Tracker(p.tracking, p, "train_teacher")
        parent.open_parent()
        with Tracker(p.tracking, p, "train_teacher") as tracker:
            tracker.log_metrics({"a": 1.0}, step=1)
        return parent, tracker

    with silent_server() as uri, caplog.at_level(logging.WARNING):
        start = time.monotonic()
        done, result = finished_within(60, stage, params(uri))
        took = time.monotonic() - start
    assert done, "a tracking server that never answers stalled the stage (MLflow waits 120 s a request, with retries)"
    parent, tracker = result
    assert took < 30 and not parent.enabled and not tracker.enabled
    assert f"MLflow tracking server {uri} does not answer" in caplog.text, caplog.text


def test_a_stage_that_fails_before_its_runs_ends_the_parent_run_failed(store):
    p = params(store, experiment="failed-before-runs")
    parent = Tracker(p.tracking, p, "train_teacher")
    parent.open_parent()
    assert MlflowClient(store).get_run(parent.parent_run_id).info.status == "RUNNING"
    parent.end_parent("FAILED")  # the executor raised before any run started (a Ray cluster that is down)
    assert MlflowClient(store).get_run(parent.parent_run_id).info.status == "FAILED"
    Tracker(p.tracking, p, "train_teacher").end_parent("FAILED")  # never opened: nothing to end, no error


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


def test_dvc_root_names_the_repo_that_queued_the_experiment(tmp_path, monkeypatch):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpxyz"  # DVC runs queued experiments here
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert repo_root() == tmp_path / "repo"
    assert repo_root(copy) == tmp_path / "repo"  # and without DVC_ROOT, from the path


def test_locked_store_calls_are_retried():
    from mlflow.exceptions import MlflowException

    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked",
                                  error_code="TEMPORARILY_UNAVAILABLE")
        return "done"

    assert retry_transient(locked_twice, delay=0.001) == "done" and len(calls) == 3

    def broken():
        calls.append(1)
        raise ValueError("not transient")

    calls.clear()
    with pytest.raises(ValueError):
        retry_transient(broken, delay=0.001)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(MlflowException, match="database is locked"):  # still locked after the last attempt
        retry_transient(locked_twice, attempts=2, delay=0.001)
    assert len(calls) == 2


def store_error(sqlite_message):
    """What MLflow's SQLAlchemy store raises for an SQLite error (mlflow.store.db.utils wraps every
    OperationalError, whatever its cause, as TEMPORARILY_UNAVAILABLE)."""
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    cause = sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", {}, sqlite3.OperationalError(sqlite_message))
    return MlflowException(message=cause, error_code=TEMPORARILY_UNAVAILABLE)


@pytest.mark.parametrize("sqlite_message", ["attempt to write a readonly database", "database or disk is full",
                                            "file is not a database", "database disk image is malformed",
                                            "unable to open database file"])
def test_a_permanent_store_error_is_not_retried(sqlite_message):
    calls = []

    def broken():
        calls.append(1)
        raise store_error(sqlite_message)

    with pytest.raises(Exception, match=sqlite_message):
        retry_transient(broken, delay=0.5)
    assert len(calls) == 1


def test_a_locked_store_error_is_retried():
    calls = []

    def locked_once():
        calls.append(1)
        if len(calls) == 1:
            raise store_error("database is locked")
        return "done"

    assert retry_transient(locked_once, delay=0.001) == "done" and len(calls) == 2


def test_a_read_only_store_switches_tracking_off_at_once_with_one_line(store, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = params(store)
    calls = []

    def read_only(*args, **kwargs):
        calls.append(1)
        raise store_error("attempt to write a readonly database")

    with Tracker(p.tracking, p, "train_teacher") as tracker:
        monkeypatch.setattr(MlflowClient, "log_batch", read_only)
        start = time.perf_counter()
        with caplog.at_level(logging.DEBUG, logger="hdkd"):
            tracker.log_metrics({"val_accuracy": 0.5}, step=1)
            tracker.log_metrics({"val_accuracy": 0.6}, step=2)
        elapsed = time.perf_counter() - start
    assert len(calls) == 1 and elapsed < 1 and not tracker.enabled
    (record,) = [r for r in caplog.records if r.name.startswith("hdkd")]
    assert "readonly database" in record.getMessage()


def _stage_of_one_experiment(uri, exp_name, barrier, results):
    import os

    os.environ["DVC_EXP_NAME"] = exp_name
    p = params(uri)
    barrier.wait()  # every experiment opens the new store at the same moment
    with Tracker(p.tracking, p, "evaluate") as tracker:
        tracker.log_metrics({"hdkd.accuracy": 0.5})
    results.put((exp_name, tracker.enabled, tracker.run_id))


def test_experiments_running_at_once_share_a_new_store(tmp_path, monkeypatch):
    """`dvc queue start -j 3` on a repo without mlflow.db: MLflow's own table creation would race."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fork = multiprocessing.get_context("fork")  # no re-import: the children start at once
    barrier, results = fork.Barrier(3), fork.Queue()
    names = [f"exp-{i}" for i in range(3)]
    children = [fork.Process(target=_stage_of_one_experiment, args=(uri, n, barrier, results)) for n in names]
    for child in children:
        child.start()
    outcomes = sorted(results.get(timeout=120) for _ in children)
    for child in children:
        child.join(timeout=30)
    assert [(name, enabled) for name, enabled, _ in outcomes] == [(n, True) for n in names]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("hdkd-synthetic").experiment_id],
                              "tags.`hdkd.stage` = 'evaluate'")
    assert sorted(r.data.tags["hdkd.dvc_exp_name"] for r in runs) == names


@pytest.mark.parametrize("stage", ["train_teacher", "train_baseline@vit"])
def test_dependency_hashes_cover_the_stage_dvc_runs_foreach_ones_included(stage):
    from hdkd.infra.provenance import stage_dep_hashes
    from tests.helpers import ROOT as root
    from tests.helpers.pipeline import DVC_YAML
    deps = DVC_YAML["stages"][stage]["deps"]
    hashes = stage_dep_hashes(stage, root)
    assert "hdkd/models" in hashes and list(hashes) == [d for d in deps if (root / d).exists()]


def test_the_ui_gets_a_model_training_experiment_a_source_and_datasets_with_dvc_digests(store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  train_teacher:\n    cmd: python -m pipeline.train_teacher\n"
                                       "    deps: [data/balanced, data/prepared]\n")
    for split in ("balanced", "prepared"):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / "labels.npy").write_bytes(split.encode())
    p = params(store)
    roles = {"data/balanced": "training", "data/prepared": "validation", "data/elsewhere": "test"}
    with Tracker(p.tracking, p, "train_teacher", datasets=roles) as tracker:
        run_id = tracker.run_id
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.source.name"] == "python -m pipeline.train_teacher"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    logged = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    # the digests are the DVC hashes the run's dependency tags carry; a path that is no dependency has none
    assert logged == {(f"synthetic-{split}", run.data.tags[f"hdkd.dep.data/{split}"].removesuffix(".dir"), role)
                      for split, role in (("balanced", "training"), ("prepared", "validation"))}


def test_a_model_is_logged_registered_and_predicts_as_its_checkpoint(store, tmp_path, monkeypatch):
    import numpy as np
    import torch

    from hdkd.models import create_model
    from hdkd.use.inference import TorchClassifier, load_classifier

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # where models:/ URIs resolve, as for `mlflow models serve`
    p = params(store)
    torch.manual_seed(0)
    model = create_model("hdkd_tiny", 3, 32)  # in training mode, as a stage hands it over: logged in eval mode
    meta = {"model_name": "hdkd_tiny", "classes": ["a", "b", "c"], "image_size": 32}
    with Tracker(p.tracking, p, "train_hdkd") as tracker:
        tracker.log_model(model, meta, "hdkd-test-hdkd")
        run_id = tracker.run_id
    client = MlflowClient(store)
    (version,) = client.search_model_versions("name='hdkd-test-hdkd'")
    run = client.get_run(run_id)
    assert version.run_id == run_id and run.info.status == "FINISHED"
    assert {k: version.tags[f"hdkd.{k}"] for k in ("git_commit", "params_hash")} == {
        k: run.data.tags[f"hdkd.{k}"] for k in ("git_commit", "params_hash")}
    served = load_classifier("models:/hdkd-test-hdkd/latest")
    assert served.classes == ("a", "b", "c") and served.image_size == 32
    x = torch.randn(5, 3, 32, 32)  # another batch size than the logged example's: the batch axis is dynamic
    expected = TorchClassifier(model.eval(), meta["classes"], 32, "pt").predict_proba(x)
    np.testing.assert_allclose(served.predict_proba(x), expected, atol=1e-6)
    logits = mlflow.pyfunc.load_model("models:/hdkd-test-hdkd/latest").predict(x.numpy())  # what the server runs
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits).double(), 1).numpy(), expected, atol=1e-6)
    signature = mlflow.models.get_model_info("models:/hdkd-test-hdkd/latest").signature
    assert signature.inputs.inputs[0].shape == (-1, 3, 32, 32) and signature.outputs.inputs[0].shape == (-1, 3)
    # pinned as installed, so loading it here raises no dependency-mismatch warning (a CUDA wheel's
    # torch.__version__, "2.14.1+cu130", did: its distribution says "2.14.1")
    from importlib.metadata import version

    from mlflow.utils.requirements_utils import _check_requirement_satisfied

    pins = Path(mlflow.pyfunc.get_model_dependencies("models:/hdkd-test-hdkd/latest")).read_text().split()
    assert {f"torch=={version('torch')}", f"mlflow=={version('mlflow')}"} <= set(pins)
    assert [_check_requirement_satisfied(pin) for pin in pins] == [None] * len(pins)
