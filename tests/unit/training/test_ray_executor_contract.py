"""The Ray executor's driver by its contract (hdkd.training.ray_executor), on a stand-in for Ray that runs each task
at once, in this process, as a node elsewhere would (its files come back as bytes, none left on this disk): which
tasks are submitted with which options, where a finished run's files land, what a failed run cancels and leaves, and
when the connection and the parent MLflow run end. tests/unit/training/test_ray_executor.py holds the same on a real
local Ray instance (slow), and the address probe."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import pytest

from hdkd.infra import numerics
from hdkd.roster import primary_run, run_name, training_runs
from hdkd.training import ray_executor
from hdkd.training.ray_executor import terminate_as_exit, train_on_ray, worker_env
from hdkd.training.run import PendingRun, StagePaths, input_fingerprint
from tests.helpers.fake_ray import FakeRay
from tests.helpers.params import make_params


def fake_train_run(name, params, paths, run, register, threads=None):
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    (paths.out_dir / "model.pt").write_text(f"{name} {run_name(run)} {register}")
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
    monkeypatch.setattr(ray_executor, "end_parent_run", lambda name, p: ended.append(name))

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
        assert (paths.out_dir / "model.pt").read_text() == f"teacher {run_name(pending.run)} {register}"
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
    assert ended == ["teacher"] and ray.shutdowns == 1  # the parent run failed; the instance it started ended


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
    assert ended == ["teacher"] and ray.submitted == [] and not any(p.is_done() for p in todo)


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
