"""A training stage's (seed, fraction) runs, through the stage code on a tiny embedded dataset: where
each run goes, what it trains on, that HDKD's run (s, f) distils from the teacher's run (s, f), and
that runs trained side by side give the bytes of runs trained one after another."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch

from hdkd.data.packed import load_split
from hdkd.data.prepare import prepare_dataset
from hdkd.data.sources import fetch_dataset
from hdkd.data.splits import nested_subsets
from hdkd.infra.distributed import DistInfo
from hdkd.models.checkpoint import load_model
from hdkd.roster import primary_run, run_file, run_files, run_name, training_runs
from hdkd.training.engine import steps_per_epoch
from hdkd.training.run import PendingRun, StagePaths, make_runtime, step_budget, training_data, training_subset
from hdkd.training.stage import train_stage
from tests.helpers.params import make_params

RUNS = {"seeds": [3, 1], "fractions": [0.5, 1.0]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    raw = {**RUNS, "data": {"root": str(root / "raw"), "image_size": 32,
                            "synthetic": {"layout": "brain_tumor_mri", "num_images": 160, "native_size": 40}},
           "train": {"batch_size": 16},
           "baselines": {"vit": {"optim": {"warmup_epochs": 1}}},  # the ViT's warmup fits the shrunk epochs
           **{s: {"epochs": 2} for s in ("teacher", "student", "distill")},
           "tracking": {"enabled": False}}
    params = make_params(raw)
    fetch_dataset(params.data, root / "raw")
    prepare_dataset(params.data, params.seed, root / "prepared", root / "raw" / "source.json")
    return root, params


def stage_paths(root, name, workers_tag, teacher=None):
    out = root / workers_tag
    return StagePaths(root / "prepared", root / "prepared", out / "models" / name, out / "reports" / f"{name}.json",
                      out / "checkpoints" / name, teacher)


def test_runs_are_named_and_placed_by_one_rule():
    params = make_params(RUNS)
    assert training_runs(params) == [(3, 1.0), (1, 1.0), (3, 0.5), (1, 0.5)]
    assert training_runs(params, "hdkd") == training_runs(params)
    assert training_runs(params, "vit") == [(3, 1.0), (1, 1.0)]  # a baseline: baseline_fractions
    assert training_runs(make_params({**RUNS, "baseline_fractions": [0.5, 1.0]}), "vit") == training_runs(params)
    assert primary_run(params) == (3, 1.0)
    assert run_name((1, 0.5)) == "seed1-frac0.5"
    assert run_file("models/hdkd", (3, 1.0), params).as_posix() == "models/hdkd/model.pt"
    assert run_file("models/hdkd", (1, 0.5), params).as_posix() == "models/hdkd/runs/seed1-frac0.5.pt"
    with pytest.raises(FileNotFoundError, match=r"trained runs missing: .*seed1-frac0.5.pt.*dvc repro train_teacher"):
        run_files("/nonexistent", params)


def test_a_fraction_trains_on_the_nested_stratified_subset_of_its_seed(workspace):
    root, params = workspace
    train = load_split(root / "prepared", "train")
    groups = pd.read_csv(root / "prepared" / "train" / "index.csv", dtype=str, keep_default_na=False)["group"]
    for seed in RUNS["seeds"]:
        part = training_subset(root / "prepared", params, seed, 0.5)
        rows = nested_subsets(train.labels, groups.to_numpy(), RUNS["fractions"], seed)[0.5]
        assert list(part.ids) == list(train.ids[rows]) and np.array_equal(part.images, train.images[rows])
        assert set(part.labels) == set(train.labels)  # every class stays
        assert 0.35 * len(train) < len(part) < 0.65 * len(train)
    assert list(training_subset(root / "prepared", params, 3, 0.5).ids) != list(
        training_subset(root / "prepared", params, 1, 0.5).ids)  # another seed, another subset


def test_every_fraction_takes_the_full_runs_optimizer_steps_on_the_same_nested_subset(workspace):
    root, params = workspace
    paths = stage_paths(root, "teacher", "budget")
    full = len(load_split(root / "prepared", "train"))
    expected = params.teacher.epochs * steps_per_epoch(full, params.train.batch_size)
    assert expected > params.teacher.epochs  # more than one step per pass: the check below can fail
    for fraction in (0.25, 0.5):
        assert step_budget(params, params.teacher, paths, fraction) == expected
    assert step_budget(params, params.teacher, paths, 1.0) is None  # the whole split: both budgets agree
    epochs = params.model_copy(update={"train": params.train.model_copy(update={"budget": "epochs"})})
    assert step_budget(epochs, params.teacher, paths, 0.5) is None  # the recipe's epochs over the share
    # The budget changes the steps, never the data: each run's subset is the same under both, and nested.
    rt = make_runtime(params, torch.device("cpu"), DistInfo())
    for seed in RUNS["seeds"]:
        sets = [training_data(p, paths, rt, (seed, 0.5))[0][0] for p in (params, epochs)]
        assert [x.split.ids.tolist() for x in sets] == [sets[0].split.ids.tolist()] * 2
        assert set(sets[0].split.ids) < set(load_split(root / "prepared", "train").ids)


def test_a_stage_trains_every_run_side_by_side_as_one_after_another(workspace):
    root, params = workspace
    results = {}
    for workers in (1, 2):
        p = params.model_copy(update={"train": params.train.model_copy(update={"run_workers": workers})})
        teacher = stage_paths(root, "teacher", f"w{workers}")
        train_stage("teacher", p, teacher)
        hdkd = stage_paths(root, "hdkd", f"w{workers}", teacher=teacher.out_dir)
        results[workers] = (train_stage("hdkd", p, hdkd), teacher, hdkd)
    summary, teacher, hdkd = results[2]
    for paths in (teacher, hdkd):
        assert sorted(p.name for p in (paths.out_dir / "runs").iterdir()) == [
            "seed1-frac0.5.pt", "seed1-frac1.pt", "seed3-frac0.5.pt"]
        assert not paths.resume_dir.exists()  # every run finished: nothing left to resume
        metrics = json.loads(paths.metrics.read_text())
        assert sorted(metrics["runs"]) == ["seed1-frac0.5", "seed1-frac1", "seed3-frac0.5", "seed3-frac1"]
        assert metrics["val_accuracy"] == metrics["runs"]["seed3-frac1"]["val_accuracy"]  # the primary's
        run = json.loads(paths.run_record.read_text())
        assert (run["seed"], run["fraction"]) == (3, 1.0)
    assert summary["runs"] == json.loads(hdkd.metrics.read_text())["runs"]
    # Byte-identical weights whether the runs trained side by side or one after another.
    for run in training_runs(params):
        for name in ("teacher", "hdkd"):
            one, two = (load_model(run_file(r[1 if name == "teacher" else 2].out_dir, run, params))[0]
                        for r in (results[1], results[2]))
            assert all(np.array_equal(a.numpy(), b.numpy())
                       for a, b in zip(one.state_dict().values(), two.state_dict().values())), (name, run)
    # Every fraction trains the full-data run's optimizer steps (train.budget: steps), in more, shorter passes
    # validated as often: once per epoch of the schedule.
    histories = {run: load_model(run_file(teacher.out_dir, run, params))[1]["history"] for run in training_runs(params)}
    assert len(histories[(1, 1.0)]) == len(histories[(1, 0.5)]) == params.teacher.epochs
    # Runs differ: another seed, another fraction, other weights.
    weights = {run: next(iter(load_model(run_file(teacher.out_dir, run, params))[0].state_dict().values()))
               for run in training_runs(params)}
    assert not np.array_equal(weights[(3, 1.0)].numpy(), weights[(1, 1.0)].numpy())
    assert not np.array_equal(weights[(3, 1.0)].numpy(), weights[(3, 0.5)].numpy())


def test_per_image_augmentation_trains_a_run_reproducibly(workspace):
    """``augment.batched: false``: the loader augments image by image (no batch hook), a stage trains on it,
    byte for byte the same when repeated, and on other images than the batched path's."""
    root, params = workspace
    one_run = {"seeds": [3], "fractions": [1.0], "train": params.train.model_copy(update={"run_workers": 1})}
    batched = params.model_copy(update=one_run)
    per_image = batched.model_copy(update={"augment": params.augment.model_copy(update={"batched": False})})
    rt = make_runtime(per_image, torch.device("cpu"), DistInfo())
    (train_set, _, _), hook = training_data(per_image, stage_paths(root, "teacher", "per-image"), rt)
    assert hook is None and train_set.transform is not None  # the per-image transform, in the loader
    assert training_data(batched, stage_paths(root, "teacher", "per-image"), rt)[1] is not None
    weights = {}
    for tag, p in (("per-image-a", per_image), ("per-image-b", per_image), ("batched", batched)):
        paths = stage_paths(root, "teacher", tag)
        train_stage("teacher", p, paths)
        model, meta = load_model(paths.out_dir / "model.pt")
        assert len(meta["history"]) == p.teacher.epochs and all(np.isfinite(h["train_loss"]) for h in meta["history"])
        weights[tag] = [t.numpy() for t in model.state_dict().values()]
    assert all(np.array_equal(a, b) for a, b in zip(weights["per-image-a"], weights["per-image-b"]))
    assert not all(np.array_equal(a, b) for a, b in zip(weights["per-image-a"], weights["batched"]))


def _record_run(name, params, paths, run, register, threads=None):
    """Stands in for ``hdkd.training.run.train_run``, in a spawned worker too: notes which process trained ``run``."""
    paths.out_dir.mkdir(parents=True)  # twice: an error
    (paths.out_dir / "pid").write_text(str(os.getpid()))
    if run_name(run) in os.environ.get("TEST_FAILING_RUNS", "").split(","):  # the environment reaches a worker
        raise RuntimeError(f"run {run} failed")
    time.sleep(0.2)


def _side_by_side(tmp_path, monkeypatch, failing=()):
    from hdkd.training import local_executor

    monkeypatch.setattr(local_executor, "train_run", _record_run)
    monkeypatch.setenv("TEST_FAILING_RUNS", ",".join(failing))
    params = make_params({"seeds": [0, 1, 2], "fractions": [0.5, 1.0], "tracking": {"enabled": False}})
    runs = training_runs(params)
    staged = {r: StagePaths(tmp_path, tmp_path, tmp_path / run_name(r), tmp_path / "m.json", tmp_path / "s")
              for r in runs}
    todo = [PendingRun(r, f"fp-{run_name(r)}", tmp_path / f"{run_name(r)}.done") for r in runs]
    return runs, todo, lambda: local_executor.train_side_by_side("teacher", params, staged, todo, 2)


def test_side_by_side_runs_each_run_once_and_this_process_trains_too(tmp_path, monkeypatch):
    runs, todo, train = _side_by_side(tmp_path, monkeypatch)
    train()
    pids = {r: int((tmp_path / run_name(r) / "pid").read_text()) for r in runs}
    # The stage's process takes the first run (it is ready while the worker spawns), the worker the second.
    assert pids[runs[0]] == os.getpid() and pids[runs[1]] != os.getpid()
    assert all(json.loads(p.mark.read_text()) == {"fingerprint": p.fingerprint} and p.is_done() for p in todo)


def test_side_by_side_stops_starting_runs_after_a_failure_and_raises_it(tmp_path, monkeypatch):
    runs, todo, train = _side_by_side(tmp_path, monkeypatch, failing=["seed0-frac1", "seed1-frac1"])
    with pytest.raises(RuntimeError, match=r"run \(0, 1.0\) failed"):
        train()
    # The first run failed here at once: only the run already given to the worker started.
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "pid").exists()) == ["seed0-frac1", "seed1-frac1"]
    assert not any(p.mark.exists() or p.is_done() for p in todo)  # failed runs are never marked done


def test_hdkd_run_distils_from_the_teachers_run_of_its_seed_and_fraction(workspace, monkeypatch):
    root, params = workspace
    import hdkd.training.run

    seen = []
    real = hdkd.training.run.load_teacher
    monkeypatch.setattr(hdkd.training.run, "load_teacher", lambda path, *a: seen.append(path) or real(path, *a))
    p = params.model_copy(update={"train": params.train.model_copy(update={"run_workers": 1})})
    teacher = stage_paths(root, "teacher", "w1")
    if not (teacher.out_dir / "model.pt").exists():
        train_stage("teacher", p, teacher)
    train_stage("hdkd", p, stage_paths(root, "hdkd", "distil", teacher=teacher.out_dir))
    assert seen == [run_file(teacher.out_dir, run, params) for run in training_runs(params)]


def test_a_tracking_server_that_is_down_is_reported_once_per_stage(workspace, tmp_path, caplog):
    from tests.helpers.data import refused_url

    root, params = workspace
    p = params.model_copy(update={
        "train": params.train.model_copy(update={"run_workers": 1}),
        "tracking": params.tracking.model_copy(update={"enabled": True, "uri": refused_url()})})
    paths = StagePaths(root / "prepared", root / "prepared", tmp_path / "student", tmp_path / "student.json",
                       tmp_path / "checkpoints")
    with caplog.at_level("WARNING"):
        train_stage("student", p, paths)
    assert caplog.text.count("continuing without tracking") == 1, caplog.text
    assert len(list((tmp_path / "student" / "runs").iterdir())) == len(training_runs(params)) - 1  # all trained
