"""The training stage's contract (hdkd.training.stage, hdkd.training.local_executor), with each run's training
replaced by a stand-in that writes the three files a run writes: which runs train, with which paths, what the
stage's outputs hold, what a resume keeps, what a failure leaves, and where the parent MLflow run ends.
(tests/unit/training/test_stage.py trains real networks through the same code.)"""

from __future__ import annotations

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest

from hdkd.roster import primary_run, run_file, run_name, training_runs
from hdkd.training import local_executor, stage
from hdkd.training.run import StagePaths
from hdkd.training.stage import train_stage
from tests.helpers.params import make_params

RUNS = {"seeds": [3, 1], "fractions": [0.5, 1.0], "tracking": {"enabled": False}}
HASH = make_params({**RUNS, "tracking": {"enabled": True}, "train": {"run_workers": 1}}).digest()
PARENT_MEMORY: list = []  # filled by a test in this process: a forked worker would inherit it, a spawned one not
LOG = "HDKD_TEST_STAGE_LOG"  # the environment reaches a spawned worker; a monkeypatch does not
FAIL = "HDKD_TEST_STAGE_FAIL"


def fake_train_run(name, params, paths, run, register, threads=None):
    """One run's files, as :func:`hdkd.training.run.train_run` writes them, each naming the run."""
    with open(os.environ[LOG], "a") as log:
        log.write(json.dumps({"name": name, "run": list(run), "register": register, "threads": threads,
                              "pid": os.getpid(), "tracking": params.tracking.enabled, "fresh": not PARENT_MEMORY,
                              "paths": {k: str(v) for k, v in vars(paths).items()}}) + "\n")
    if run_name(run) in os.environ.get(FAIL, "").split(","):
        raise RuntimeError(f"run {run_name(run)} failed")
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    (paths.out_dir / "model.pt").write_text(f"weights of {name} {run_name(run)}")
    summary = {"val_accuracy": run[0] + run[1], "epoch": 2}
    paths.metrics.write_text(json.dumps(summary))
    paths.run_record.write_text(json.dumps({"run_id": run_name(run)}))
    return summary


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Stage paths under tmp_path (prepared splits of one file each) and the stand-in in place of a run."""
    for split in ("train", "val", "teacher"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "data.bin").write_text(split)
    monkeypatch.setattr(local_executor, "train_run", fake_train_run)
    monkeypatch.setenv(LOG, str(tmp_path / "calls.jsonl"))
    monkeypatch.delenv(FAIL, raising=False)
    return tmp_path


def paths_of(root, teacher=False) -> StagePaths:
    return StagePaths(root / "train", root / "val", root / "models" / "student", root / "reports" / "student.json",
                      root / "checkpoints" / "student", root / "teacher" if teacher else None)


def settings(change=None, workers=1):
    raw = {**RUNS, "train": {"run_workers": workers}}
    for key, value in (change or {}).items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return make_params(raw)


def calls(root) -> list[dict]:
    log = root / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def trained(root) -> list[str]:
    return [run_name(tuple(c["run"])) for c in calls(root)]


def test_every_run_trains_once_in_a_directory_of_its_own_and_the_primary_alone_is_registered(workspace):
    params, paths = settings(), paths_of(workspace)
    train_stage("student", params, paths)
    runs = training_runs(params, "student")
    assert trained(workspace) == [run_name(r) for r in runs]  # the primary first, then by fraction and seed
    for call, run in zip(calls(workspace), runs, strict=True):
        work = paths.resume_dir / run_name(run)
        assert call["name"] == "student" and call["register"] == (run == primary_run(params))
        assert call["paths"] == {"train": str(paths.train), "val": str(paths.val), "out_dir": str(work / "out"),
                                 "metrics": str(work / "out" / "metrics.json"), "resume_dir": str(work / "state"),
                                 "teacher": "None", "run_record": str(work / "out" / "metrics.run.json")}
        assert call["threads"] is None  # one after another: the process's own threads


def test_the_outputs_hold_every_run_the_primary_in_front(workspace):
    params, paths = settings(), paths_of(workspace)
    returned = train_stage("student", params, paths)
    runs = training_runs(params, "student")
    for run in runs:  # each run's weights where run_file says, and nothing else there
        assert run_file(paths.out_dir, run, params).read_text() == f"weights of student {run_name(run)}"
    assert sorted(p.name for p in (paths.out_dir / "runs").iterdir()) == sorted(
        f"{run_name(r)}.pt" for r in runs if r != primary_run(params))
    assert sorted(p.name for p in paths.out_dir.iterdir()) == ["model.pt", "runs"]
    metrics = json.loads(paths.metrics.read_text())
    assert metrics == returned == {"val_accuracy": 4.0, "epoch": 2, "runs": {
        run_name(r): {"val_accuracy": r[0] + r[1], "epoch": 2} for r in runs}}
    assert json.loads(paths.run_record.read_text()) == {"run_id": "seed3-frac1"}  # the primary's MLflow run
    assert not paths.resume_dir.exists()  # finished: nothing left to resume


def test_a_distilling_stage_gives_each_run_the_teachers_run_of_its_seed_and_fraction(workspace):
    params, paths = settings(), paths_of(workspace, teacher=True)
    train_stage("hdkd", params, paths)
    assert [c["paths"]["teacher"] for c in calls(workspace)] == [
        str(run_file(paths.teacher, r, params)) for r in training_runs(params, "hdkd")]


def test_a_baseline_trains_at_the_baseline_fractions_only(workspace):
    params = settings({"baseline_fractions": [1.0]})
    train_stage("resnet", params, paths_of(workspace))
    assert trained(workspace) == ["seed3-frac1", "seed1-frac1"]
    assert sorted(p.name for p in (paths_of(workspace).out_dir / "runs").iterdir()) == ["seed1-frac1.pt"]


def test_a_failed_run_leaves_no_output_and_a_resume_trains_only_what_was_not_finished(workspace, monkeypatch,
                                                                                       caplog):
    params, paths = settings(), paths_of(workspace)
    monkeypatch.setenv(FAIL, "seed3-frac0.5")
    with pytest.raises(RuntimeError, match="seed3-frac0.5 failed"):
        train_stage("student", params, paths)
    assert trained(workspace) == ["seed3-frac1", "seed1-frac1", "seed3-frac0.5"]  # none started after it
    assert not paths.out_dir.exists() and not paths.metrics.exists() and not paths.run_record.exists()
    monkeypatch.delenv(FAIL)
    (workspace / "calls.jsonl").unlink()
    with caplog.at_level("INFO", logger="hdkd.training.stage"):
        metrics = train_stage("student", params, paths)
    assert trained(workspace) == ["seed3-frac0.5", "seed1-frac0.5"]  # the finished two kept
    assert f"train_student: 4 runs (2 trained now) -> {paths.out_dir}" in caplog.messages
    assert sorted(metrics["runs"]) == sorted(run_name(r) for r in training_runs(params))
    assert run_file(paths.out_dir, (1, 1.0), params).read_text() == "weights of student seed1-frac1"


@pytest.mark.parametrize(("model", "change", "retrains"), [
    ("student", {"student": {"lr": 1e-3}}, True),  # a result changes: a stale model must not ship
    ("student", {"seed": 7}, True),  # the data's seed
    ("student", {"baselines": {"vit": {"optim": {"lr": 1e-3}}}}, False),  # a baseline's recipe
    ("vit", {"baselines": {"vit": {"optim": {"lr": 1e-3}}}}, True),  # ... is that baseline's own
    ("vit", {"baselines": {"resnet": {"optim": {"lr": 1e-3}}}}, False),  # another baseline's
    ("student", {"seeds": [3, 1, 5]}, False),  # one more seed: the finished runs stay valid
    ("student", {"tracking": {"enabled": False, "experiment": "elsewhere"}}, False),  # where it is logged
])
def test_a_finished_run_is_kept_only_while_its_inputs_are_unchanged(workspace, monkeypatch, model, change, retrains):
    params, paths = settings({"baseline_fractions": [0.5, 1.0]}), paths_of(workspace)
    monkeypatch.setenv(FAIL, "seed1-frac0.5")  # three runs finish, then the stage fails
    with pytest.raises(RuntimeError):
        train_stage(model, params, paths)
    monkeypatch.delenv(FAIL)
    (workspace / "calls.jsonl").unlink()
    changed = settings({"baseline_fractions": [0.5, 1.0], **change})
    train_stage(model, changed, paths)
    done_before = ["seed3-frac1", "seed1-frac1", "seed3-frac0.5"]
    expected = [run_name(r) for r in training_runs(changed, model)]
    assert trained(workspace) == (expected if retrains else [r for r in expected if r not in done_before])


def test_an_edited_input_file_makes_the_runs_that_read_it_pending_again(workspace, monkeypatch):
    params, paths = settings(), paths_of(workspace, teacher=True)
    for run in training_runs(params):  # the teacher stage's outputs
        run_file(paths.teacher, run, params).parent.mkdir(exist_ok=True)
        run_file(paths.teacher, run, params).write_text(f"teacher {run_name(run)}")

    def interrupted_then_resumed(edit):
        monkeypatch.setenv(FAIL, "seed1-frac0.5")
        with pytest.raises(RuntimeError):
            train_stage("hdkd", params, paths)
        monkeypatch.delenv(FAIL)
        (workspace / "calls.jsonl").unlink()
        edit()
        train_stage("hdkd", params, paths)
        return trained(workspace)

    # the teacher's run of seed 3 on half the data: only the HDKD run that distils from it
    assert interrupted_then_resumed(lambda: run_file(paths.teacher, (3, 0.5), params).write_text("retrained")) == [
        "seed3-frac0.5", "seed1-frac0.5"]
    (workspace / "calls.jsonl").unlink()
    # the training split: every run
    assert interrupted_then_resumed(lambda: (workspace / "train" / "data.bin").write_text("rebalanced")) == [
        run_name(r) for r in training_runs(params)]


def test_a_finished_stage_replaces_its_outputs_whole(workspace):
    params, paths = settings(), paths_of(workspace)
    (paths.out_dir / "runs").mkdir(parents=True)
    (paths.out_dir / "runs" / "seed9-frac0.5.pt").write_text("an earlier params' run")
    train_stage("student", params, paths)
    assert not (paths.out_dir / "runs" / "seed9-frac0.5.pt").exists()
    assert len(list((paths.out_dir / "runs").iterdir())) == len(training_runs(params)) - 1


def test_run_workers_choose_where_the_runs_train(workspace, monkeypatch):
    seen = []
    monkeypatch.setattr(stage, "train_side_by_side", lambda name, p, staged, todo, workers: seen.append(
        ("side by side", workers, len(todo))) or local_executor.train_one_after_another(name, p, staged, todo))
    real = stage.train_one_after_another
    monkeypatch.setattr(stage, "train_one_after_another", lambda name, p, staged, todo, mark_done=True: seen.append(
        ("one after another", mark_done, len(todo))) or real(name, p, staged, todo, mark_done))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    for workers in (1, 2, 8, 0):  # 0: one per CPU; never more than the runs to train
        train_stage("student", settings(workers=workers), paths_of(workspace / str(workers)))
    assert seen == [("one after another", True, 4), ("side by side", 2, 4), ("side by side", 4, 4),
                    ("side by side", 3, 4)]
    seen.clear()
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one at a time
    train_stage("student", settings(workers=0), paths_of(workspace / "unknown"))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU trains one run at a time
    for device in ("auto", "cuda"):
        train_stage("student", settings({"train": {"device": device}}, workers=2), paths_of(workspace / device))
    assert seen == [("one after another", True, 4)] * 3


def test_train_executor_ray_trains_the_runs_as_tasks_that_a_node_of_the_same_workspace_accepts(workspace,
                                                                                                monkeypatch):
    from hdkd.training import ray_executor
    from tests.helpers.fake_ray import FakeRay

    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(ray_executor, "train_run", fake_train_run)
    monkeypatch.setattr(stage, "train_side_by_side", lambda *a: pytest.fail("trained side by side here"))
    params, paths = settings({"train": {"executor": "ray", "run_workers": 2}}), paths_of(workspace)
    train_stage("student", params, paths)
    assert [o["name"] for o, _ in ray.submitted] == [f"train_student {run_name(r)}" for r in training_runs(params)]
    for run in training_runs(params):  # each task's files, written here by the driver (the node kept none)
        assert run_file(paths.out_dir, run, params).read_text() == f"weights of student {run_name(run)}"


@pytest.mark.parametrize(("executor", "backend"), [("local", "nccl"), ("ray", "gloo")])
def test_under_torchrun_cuda_runs_join_an_nccl_group_and_a_ray_driver_a_cpu_one(workspace, monkeypatch, executor,
                                                                                backend):
    """A Ray driver trains nothing itself: it needs no GPU (train.device: cuda names the workers')."""
    import torch

    from hdkd.infra import distributed
    from hdkd.training import ray_executor

    groups = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(groups))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: groups.append(backend))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: groups.append("destroyed"))
    monkeypatch.setattr(ray_executor, "train_on_ray", lambda name, p, staged, todo:
                        local_executor.train_one_after_another(name, p, staged, todo))
    train_stage("student", settings({"train": {"executor": executor, "device": "cuda"}}), paths_of(workspace))
    assert groups == [backend, "destroyed"]


def test_a_ray_driver_without_a_gpu_hands_cuda_runs_to_the_cluster(workspace, monkeypatch):
    import torch

    from hdkd.training import ray_executor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the head node: CPUs only
    monkeypatch.setattr(ray_executor, "train_on_ray", lambda name, p, staged, todo:
                        local_executor.train_one_after_another(name, p, staged, todo))
    params = settings({"train": {"executor": "ray", "device": "cuda"}})
    assert sorted(train_stage("student", params, paths_of(workspace))["runs"]) == sorted(
        run_name(r) for r in training_runs(params))
    with pytest.raises(RuntimeError, match="train.device is 'cuda' but no CUDA device is available"):
        train_stage("student", settings({"train": {"device": "cuda"}}), paths_of(workspace / "local"))


@pytest.mark.parametrize(("cpus", "threads"), [(5, 2), (1, 1)])  # whole threads, at least one each
def test_side_by_side_gives_each_worker_its_share_of_the_cpus_and_the_outputs_of_one_after_another(workspace,
                                                                                                  monkeypatch, cpus,
                                                                                                  threads):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    params = settings({"seeds": [3]}, workers=2)
    monkeypatch.setattr(sys.modules[__name__], "PARENT_MEMORY", ["this process's state"])
    train_stage("student", params, paths_of(workspace / "side"))
    train_stage("student", settings({"seeds": [3]}), paths_of(workspace / "one"))
    side, one = calls(workspace)[:2], calls(workspace)[2:]
    assert [c["threads"] for c in side] == [threads] * 2 and [c["threads"] for c in one] == [None, None]
    assert [c["register"] for c in side] == [c["register"] for c in one] == [True, False]  # the primary alone
    assert side[0]["pid"] == os.getpid() != side[1]["pid"]  # this process trains the first run itself
    # a worker is spawned afresh: no thread pool, lock or MLflow run of this process is forked into it
    assert not side[0]["fresh"] and side[1]["fresh"]
    for a, b in zip(sorted((workspace / "side").rglob("*")), sorted((workspace / "one").rglob("*")), strict=True):
        assert a.relative_to(workspace / "side") == b.relative_to(workspace / "one")
        assert not a.is_file() or a.read_bytes() == b.read_bytes()


class FakeTracker:
    """The parent MLflow run's life, recorded (``reachable``: whether the server answered)."""

    events: list = []
    reachable = True

    def __init__(self, cfg, params, stage_name):
        self.enabled = cfg.enabled
        FakeTracker.events.append(("made", stage_name, params.digest()))  # the run is found by its params' hash

    def open_parent(self):
        self.enabled = self.enabled and FakeTracker.reachable
        FakeTracker.events.append(("open",))

    def end_parent(self, status="FAILED"):
        FakeTracker.events.append(("end", status))


@pytest.fixture
def tracker(monkeypatch):
    FakeTracker.events, FakeTracker.reachable = [], True
    monkeypatch.setattr(stage, "Tracker", FakeTracker)
    return FakeTracker


def test_the_parent_run_opens_before_the_runs_and_fails_with_the_stage(workspace, monkeypatch, tracker):
    params, paths = settings({"tracking": {"enabled": True}}), paths_of(workspace)
    monkeypatch.setenv(FAIL, "seed1-frac1")
    with pytest.raises(RuntimeError):
        train_stage("student", params, paths)
    assert tracker.events == [("made", "train_student", HASH), ("open",), ("end", "FAILED")]
    assert all(c["tracking"] for c in calls(workspace))


def test_an_unreachable_server_lets_the_runs_train_untracked(workspace, tracker):
    tracker.reachable = False
    train_stage("student", settings({"tracking": {"enabled": True}}), paths_of(workspace))
    assert len(calls(workspace)) == 4 and not any(c["tracking"] for c in calls(workspace))  # said once, here
    assert tracker.events == [("made", "train_student", HASH), ("open",)]  # a success: the runs end it, not the stage


def test_a_stage_with_every_run_finished_trains_nothing_and_opens_no_run(workspace, monkeypatch, tracker):
    params, paths = settings({"tracking": {"enabled": True}}), paths_of(workspace)
    kept = SimpleNamespace(copyfile=shutil.copyfile, rmtree=lambda *a, **k: None)  # the resume states outlive it
    monkeypatch.setattr(stage, "shutil", kept)  # the stage's shutil alone: output sets still replace what they must
    first = train_stage("student", params, paths)
    paths.metrics.unlink()
    (workspace / "calls.jsonl").unlink()
    tracker.events.clear()
    assert train_stage("student", params, paths) == first == json.loads(paths.metrics.read_text())
    assert calls(workspace) == [] and tracker.events == []


def test_a_failed_run_on_another_rank_raises_its_own_error(workspace, monkeypatch, tracker):
    from hdkd.infra import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv(FAIL, "seed3-frac1")
    with pytest.raises(RuntimeError, match="run seed3-frac1 failed"):
        train_stage("student", settings({"tracking": {"enabled": True}}), paths_of(workspace))
    assert tracker.events == []  # rank 0 keeps the parent run
    monkeypatch.delenv(FAIL)
    paths = paths_of(workspace / "finished")
    assert train_stage("student", settings(), paths) == {}  # rank 0 writes the outputs ...
    assert not list(paths.resume_dir.rglob("done.json")) and not paths.metrics.exists()  # ... and marks the runs


def test_train_one_after_another_marks_only_when_asked(workspace):
    from hdkd.training.run import PendingRun

    params, paths = settings({"seeds": [3]}), paths_of(workspace)
    runs = training_runs(params)
    staged = {r: StagePaths(paths.train, paths.val, workspace / run_name(r), workspace / f"{run_name(r)}.json",
                            workspace / "state") for r in runs}
    for mark_done in (False, True, None):
        todo = [PendingRun(r, "fp", workspace / f"{run_name(r)}-{mark_done}.done") for r in runs]
        given = {} if mark_done is None else {"mark_done": mark_done}  # by default: marked
        local_executor.train_one_after_another("student", params, staged, todo, **given)
        assert [p.is_done() for p in todo] == [mark_done is not False] * len(runs)  # other ranks leave it to rank 0
    assert [c["register"] for c in calls(workspace)] == [True, False] * 3


def test_this_processs_own_run_trains_in_a_daemon_thread_whose_error_reaches_its_future():
    """Ctrl-C then stops the stage at once: a daemon thread is not joined at exit."""
    import threading

    ok = local_executor._in_a_thread(lambda x: (x, threading.current_thread().daemon), 5)
    assert ok.result(timeout=10) == (5, True)
    failed = local_executor._in_a_thread(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(timeout=10)
