"""The Ray executor's driver by its contract (hdkd.training.ray_executor), on a stand-in for Ray that runs each task
at once, in this process, as a node elsewhere would (its files come back as bytes, none left on this disk): which
tasks are submitted with which options, where a finished run's files land, what a failed run cancels and leaves, and
when the connection and the parent MLflow run end. tests/unit/training/test_ray_executor.py holds the same on a real
local Ray instance (slow), and the address probe."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading

import pytest

from hdkd.infra import numerics
from hdkd.roster import primary_run, roster, run_name, training_runs
from hdkd.training import ray_executor
from hdkd.training.ray_executor import terminate_as_exit, train_on_ray, worker_env
from hdkd.training.run import PendingRun, StagePaths, input_fingerprint
from tests.helpers.fake_ray import FakeRay
from tests.helpers.params import make_params


def fake_train_run(name, params, paths, run, register, threads=None):
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    (paths.out_dir / "model.pt").write_text(f"{name} {run_name(run)} {register} {params.train.executor}")
    paths.metrics.write_text(json.dumps({"val_accuracy": run[1]}))
    paths.run_record.write_text(json.dumps({"run_id": run_name(run)}))


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """The staged paths and pending runs of a teacher stage of 2 seeds x 2 fractions; the stand-in for Ray."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "x.npy").write_text(split)
    params = make_params({"seeds": [3, 1], "fractions": [0.5, 1.0], "tracking": {"enabled": False},
                          "train": {"executor": "ray", "ray_retries": 2}})
    staged, todo = {}, []
    for run in training_runs(params):
        work = tmp_path / "state" / run_name(run)
        staged[run] = StagePaths(tmp_path / "train", tmp_path / "val", work / "out", work / "out" / "metrics.json",
                                 work / "resume")
        todo.append(PendingRun(run, input_fingerprint("teacher", params, staged[run], run), work / "done.json"))
    monkeypatch.setattr(ray_executor, "train_run", fake_train_run)
    ended = []
    monkeypatch.setattr(ray_executor, "end_parent_run", lambda name, p: ended.append((name, p)))

    def with_ray(fake):
        monkeypatch.setitem(sys.modules, "ray", fake)
        return fake

    return params, staged, todo, with_ray, ended


def test_each_unfinished_run_is_one_task_with_the_runs_options(stage, tmp_path):
    params, staged, todo, with_ray, _ = stage
    ray = with_ray(FakeRay())
    train_on_ray("teacher", params, staged, todo[1:])  # the primary finished already
    assert [o["name"] for o, _ in ray.submitted] == [f"train_teacher {run_name(p.run)}" for p in todo[1:]]
    for (options, args), pending in zip(ray.submitted, todo[1:], strict=True):
        assert options == {"name": f"train_teacher {run_name(pending.run)}", "max_retries": 2,
                           "retry_exceptions": False,  # a Python error would fail again: only a lost worker retries
                           "runtime_env": {"env_vars": worker_env(params, str(tmp_path.resolve()))}, "num_cpus": 1}
        assert args == ("teacher", params, staged[pending.run], pending.run, pending.run == primary_run(params),
                        pending.fingerprint, str(tmp_path.resolve()))
    assert ray.inits == [{"address": None, "log_to_driver": True}] and ray.shutdowns == 1


def test_a_finished_runs_files_are_written_here_and_the_run_marked_done(stage):
    params, staged, todo, with_ray, ended = stage
    with_ray(FakeRay())
    train_on_ray("teacher", params, staged, todo)
    for pending in todo:
        paths = staged[pending.run]
        register = pending.run == primary_run(params)
        assert (paths.out_dir / "model.pt").read_text() == f"teacher {run_name(pending.run)} {register} ray"
        assert json.loads(paths.run_record.read_text()) == {"run_id": run_name(pending.run)}
        assert json.loads(paths.metrics.read_text()) == {"val_accuracy": pending.run[1]}
        assert pending.is_done()
    assert ended == []


def test_a_failed_run_cancels_the_others_raises_its_error_and_is_never_marked_done(stage):
    params, staged, todo, with_ray, ended = stage
    ray = with_ray(FakeRay(failing={"seed1-frac1"}))
    with pytest.raises(RuntimeError, match="train_teacher seed1-frac1 failed"):
        train_on_ray("teacher", params, staged, todo)
    assert [p.is_done() for p in todo] == [True, False, False, False]  # the run finished before it counts
    assert ray.cancelled == ["train_teacher seed3-frac0.5", "train_teacher seed1-frac0.5"]
    assert ended == [("teacher", params)] and ray.shutdowns == 1  # the parent run failed; its Ray instance ended


def test_a_run_that_had_finished_when_another_failed_still_counts(stage):
    params, staged, todo, with_ray, _ = stage
    ray = with_ray(FakeRay(failing={"seed1-frac1"}, finished={"seed1-frac0.5"}))
    with pytest.raises(RuntimeError, match="train_teacher seed1-frac1 failed"):
        train_on_ray("teacher", params, staged, todo)
    assert ray.cancelled == ["train_teacher seed3-frac0.5", "train_teacher seed1-frac0.5"]
    assert [p.is_done() for p in todo] == [True, False, False, True]  # cancelled too late: its files are kept
    assert (staged[todo[3].run].out_dir / "model.pt").read_text() == "teacher seed1-frac0.5 False ray"


def test_a_baselines_tasks_are_named_by_its_stage_and_their_submission_is_logged(stage, caplog):
    params, staged, todo, with_ray, _ = stage
    ray = with_ray(FakeRay())
    todo = [dataclasses.replace(p, fingerprint=input_fingerprint("vit", params, staged[p.run], p.run)) for p in todo]
    with caplog.at_level(logging.INFO, logger="hdkd.training.ray_executor"):
        train_on_ray("vit", params, staged, todo)
    assert [o["name"] for o, _ in ray.submitted] == [f"train_baseline@vit {run_name(p.run)}" for p in todo]
    assert caplog.messages == ["train_baseline@vit: 4 runs submitted to Ray ({'CPU': 2.0})"]


def test_a_failed_stage_marks_the_pipelines_parent_run_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from hdkd.infra.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = make_params({"tracking": {"uri": store}})
    parent = Tracker(params.tracking, params, "train_baseline@vit")
    parent.open_parent()
    ray_executor.end_parent_run("vit", params)  # a baseline: its stage is found in params
    assert MlflowClient(store).get_run(parent.parent_run_id).info.status == "FAILED"


def test_a_parent_run_that_cannot_be_marked_failed_is_only_said(caplog):
    params = make_params({"tracking": {"enabled": True}})
    with caplog.at_level(logging.WARNING, logger="hdkd.training.ray_executor"):
        ray_executor.end_parent_run("no_such_model", params)  # the stage's own error is the one raised
    known = ", ".join(e.name for e in roster(params))
    assert caplog.messages == ["could not mark the MLflow parent run failed (KeyError: \"no model 'no_such_model' "
                               f"in the roster; known: {known}\")"]
    caplog.clear()
    ray_executor.end_parent_run("no_such_model", make_params({"tracking": {"enabled": False}}))
    assert caplog.messages == []  # untracked: no parent run


def test_a_task_trains_its_run_in_the_workspace_and_returns_its_files(stage, tmp_path, monkeypatch):
    params, staged, todo, _, _ = stage
    pending = todo[1]
    monkeypatch.chdir("/")
    files = ray_executor._run_task("teacher", params, staged[pending.run], pending.run, False, pending.fingerprint,
                                   str(tmp_path))
    paths = staged[pending.run]
    assert files == {str(p): p.read_bytes() for p in (paths.out_dir / "model.pt", paths.run_record, paths.metrics)}
    assert files[str(paths.out_dir / "model.pt")] == b"teacher seed1-frac1 False ray"
    assert os.getcwd() == str(tmp_path)  # the stage's relative paths are the workspace's


def test_a_task_on_a_node_without_the_workspace_or_with_other_inputs_stops_before_training(stage, tmp_path):
    params, staged, todo, _, _ = stage
    pending, host = todo[1], socket.gethostname()
    with pytest.raises(FileNotFoundError) as e:
        ray_executor._run_task("teacher", params, staged[pending.run], pending.run, False, pending.fingerprint,
                               str(tmp_path / "missing"))
    assert str(e.value) == (f"Ray node {host} has no workspace at {tmp_path / 'missing'}: every node needs the "
                            "repository and the stage's inputs at the driver's path (a shared file system, or "
                            "a clone + `dvc pull`)")
    with pytest.raises(RuntimeError) as e:
        ray_executor._run_task("teacher", params, staged[pending.run], pending.run, False, "other", str(tmp_path))
    assert str(e.value) == (f"Ray node {host} sees other inputs than the driver in {tmp_path} ({tmp_path / 'train'}, "
                            f"{tmp_path / 'val'}) for run seed1-frac1: sync the workspace (git pull, `dvc pull` or "
                            "`dvc repro` up to this stage's dependencies)")
    assert not staged[pending.run].out_dir.exists()


def test_a_connection_of_the_caller_is_kept_and_nothing_to_train_needs_ray(stage, monkeypatch):
    params, staged, todo, with_ray, _ = stage
    ray = with_ray(FakeRay(initialized=True))
    train_on_ray("teacher", params, staged, todo)
    assert ray.inits == [] and ray.shutdowns == 0 and ray.initialized
    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray would fail
    train_on_ray("teacher", params, staged, [])


def test_a_failed_connection_fails_the_parent_run(stage, monkeypatch):
    params, staged, todo, with_ray, ended = stage
    ray = with_ray(FakeRay())

    def refuse(**kwargs):
        raise ConnectionError("no cluster")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConnectionError, match="no cluster"):
        train_on_ray("teacher", params, staged, todo)
    assert ended == [("teacher", params)] and ray.submitted == [] and not any(p.is_done() for p in todo)


def test_a_workers_environment_puts_the_workspace_first_and_forwards_the_experiment(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    env = worker_env(make_params({"train": {"reproducible": False}}), "/ws")
    assert env == {"PYTHONPATH": f"/ws{os.pathsep}${{PYTHONPATH}}", "MLFLOW_TRACKING_URI": "http://tracking:5000",
                   "DVC_EXP_NAME": "exp-1"}
    reproducible = worker_env(make_params({"train": {"reproducible": True}}), "/ws")
    assert reproducible == {**env, **numerics.REPRODUCIBLE_ENV} and numerics.REPRODUCIBLE_ENV


def test_sigterm_ends_the_driver_as_an_exit_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_, terminate_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
        pytest.fail("SIGTERM did not end the block")
    assert exit_.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []

    def in_a_thread():  # only the main thread may set a handler: elsewhere it is left alone
        with terminate_as_exit():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [before]
