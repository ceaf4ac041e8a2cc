import logging
import math
import re

import pytest
import torch

from hdkd.checkpoint import save_model
from hdkd.engine import FitSettings, build_optimizer, fit, is_better, lr_at, validate
from hdkd.io import read_json
from hdkd.models import create_model
from hdkd.tracking import Tracker
from hdkd.train import StagePaths, build_criterion, input_fingerprint, load_teacher, run_training
from tests.fit_fixtures import CPU, interruptible_fit, toy_split
from tests.params_fixtures import make_params, section


def teacher_cfg(epochs=3, **kw):
    return section("teacher", epochs=epochs, optimizer="adam", lr=3e-3, **kw)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = section("student", epochs=10, optimizer="adamw", lr=1e-3, schedule="cosine", warmup_epochs=2, warmup_lr=1e-4,
                  min_lr=1e-5)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 1) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 2) == pytest.approx(1e-3)
    assert lr_at(cfg, 6) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(cfg, 10) == pytest.approx(1e-5)
    assert lr_at(section("teacher", epochs=3, optimizer="adam", lr=1e-3, schedule="none"), 2.5) == 1e-3


def test_weight_decay_skips_biases_and_norms():
    model = create_model("student_tiny", 3, image_size=32)
    opt = build_optimizer(model, section("student", optimizer="adamw", lr=1e-3, weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_selection_prefers_accuracy_then_loss():
    assert is_better({"val_accuracy": 0.5, "val_loss": 1.0}, None)
    assert is_better({"val_accuracy": 0.6, "val_loss": 9.0}, {"val_accuracy": 0.5, "val_loss": 1.0})
    assert is_better({"val_accuracy": 0.5, "val_loss": 0.9}, {"val_accuracy": 0.5, "val_loss": 1.0})
    assert not is_better({"val_accuracy": 0.5, "val_loss": 1.0}, {"val_accuracy": 0.5, "val_loss": 1.0})


def test_teacher_learns_and_is_deterministic():
    train, val = toy_split(96), toy_split(48, seed=1)

    def run():
        torch.manual_seed(0)
        model = create_model("teacher_tiny", 3, image_size=32)
        return fit(model, build_criterion("teacher", teacher_cfg()), train, val, CPU,
                   FitSettings(teacher_cfg(), seed=0, batch_size=16)), model

    (first, model), (second, _) = run(), run()
    assert first.best["val_accuracy"] > 0.8  # chance is 1/3
    assert [r["val_loss"] for r in first.history] == [r["val_loss"] for r in second.history]
    assert [r["train_loss"] for r in first.history] == [r["train_loss"] for r in second.history]
    # The returned model holds the best epoch's weights.
    assert validate(model, torch.utils.data.DataLoader(val, batch_size=16), CPU)["val_accuracy"] == first.best[
        "val_accuracy"]


def test_an_interrupted_fit_resumes_and_ends_identically(tmp_path, caplog):
    train, val = toy_split(64), toy_split(32, seed=1)
    cfg = section("student", epochs=4, optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine",
                  warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5)

    def run(resume_dir, stop_after=None):
        def student():  # dropout: the random draws must resume too
            return create_model("student_tiny", 3, image_size=32, dropout=0.1)

        return interruptible_fit(student, "student", cfg, train, val, seed=3, resume_dir=resume_dir,
                                 stop_after=stop_after)[0]

    straight = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=2)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    with caplog.at_level(logging.INFO, logger="hdkd.engine"):
        resumed = run(tmp_path)
    assert "resuming from epoch 2 of 4" in caplog.text
    assert resumed.resumed_from == 2
    timing = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in straight.history]
    assert resumed.best == straight.best


def test_a_resumed_fit_keeps_the_best_epoch_from_before_the_interruption(tmp_path):
    train, val = toy_split(32), toy_split(16, seed=1)
    val.tensors[1].add_(1).remainder_(3)  # wrong labels: the more it learns, the worse it validates
    cfg = teacher_cfg(epochs=4)

    def run(resume_dir, stop_after=None):
        return interruptible_fit(lambda: create_model("teacher_tiny", 3, image_size=32), "teacher", cfg, train, val,
                                 seed=0, resume_dir=resume_dir, stop_after=stop_after)

    straight, straight_model = run(None)
    assert straight.best_epoch <= 2  # else the test would not test the selection made before the interruption
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=2)
    resumed, resumed_model = run(tmp_path)
    assert resumed.resumed_from == 2 and resumed.best_epoch == straight.best_epoch
    straight_weights, resumed_weights = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)


def test_resume_state_of_other_inputs_is_ignored(tmp_path, caplog):
    train, val = toy_split(32), toy_split(16, seed=1)
    cfg = teacher_cfg(epochs=1)
    model = create_model("teacher_tiny", 3, image_size=32)
    settings = FitSettings(cfg, seed=0, batch_size=16, resume_dir=tmp_path, fingerprint="old")
    fit(model, build_criterion("teacher", cfg), train, val, CPU, settings)
    with caplog.at_level(logging.INFO):
        result = fit(create_model("teacher_tiny", 3, image_size=32), build_criterion("teacher", cfg), train, val,
                     CPU, FitSettings(cfg, seed=0, batch_size=16, resume_dir=tmp_path, fingerprint="new"))
    assert result.resumed_from == 0 and "starting afresh" in caplog.text


def test_a_corrupt_best_checkpoint_is_discarded_with_the_rest_of_the_resume_state(tmp_path, caplog):
    train, val = toy_split(32), toy_split(16, seed=1)

    def run(epochs):
        cfg = teacher_cfg(epochs=epochs)
        return fit(create_model("teacher_tiny", 3, image_size=32), build_criterion("teacher", cfg), train, val, CPU,
                   FitSettings(cfg, seed=0, batch_size=16, resume_dir=tmp_path, fingerprint="f"))

    run(2)
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="hdkd"):
        result = run(3)
    assert result.resumed_from == 0 and len(result.history) == 3
    assert "best.pt" in caplog.text and "starting afresh" in caplog.text


def test_hdkd_fit_logs_every_loss_part(tmp_path):
    train, val = toy_split(48), toy_split(16, seed=1)
    teacher_path = tmp_path / "teacher.pt"
    save_model(teacher_path, create_model("teacher_tiny", 3, image_size=32), "teacher_tiny", ["a", "b", "c"], 32, {})
    student = create_model("hdkd_tiny", 3, image_size=32)
    cfg = section("distill", epochs=1, optimizer="adamw", lr=1e-3, weight_decay=0.0, schedule="none", alpha=0.5,
                  **{"lambda": 10.0})
    teacher = load_teacher(teacher_path, ["a", "b", "c"], student, cfg.stages, "cpu")
    rows = []
    fit(student, build_criterion("hdkd", cfg), train, val, CPU, FitSettings(cfg, seed=0, batch_size=16),
        teacher=teacher, on_epoch=rows.append)
    (row,) = rows
    assert row["train_ce"] > 0 and row["train_logit_kd"] > 0 and row["train_feature_kd"] > 0
    assert math.isclose(row["train_loss"], 0.5 * row["train_ce"] + 0.5 * row["train_logit_kd"]
                        + 10 * row["train_feature_kd"], rel_tol=1e-6)


def test_teacher_checks_fail_early_and_clearly(tmp_path):
    student = create_model("hdkd_tiny", 3, image_size=32)
    with pytest.raises(FileNotFoundError, match="dvc repro train_teacher"):
        load_teacher(tmp_path / "none.pt", ["a", "b", "c"], student, (1, 2, 3), "cpu")
    path = tmp_path / "t.pt"
    save_model(path, create_model("teacher_tiny", 2, image_size=32), "teacher_tiny", ["a", "b"], 32, {})
    with pytest.raises(ValueError, match=r"classes \['a', 'b'\]"):
        load_teacher(path, ["a", "b", "c"], student, (1, 2, 3), "cpu")
    save_model(path, create_model("teacher_tiny", 3, image_size=32, stem_stride=4), "teacher_tiny", ["a", "b", "c"],
               32, {"stem_stride": 4})
    with pytest.raises(ValueError, match="stage 1 maps are"):
        load_teacher(path, ["a", "b", "c"], student, (1, 2, 3), "cpu")


def test_a_split_too_small_for_batchnorm_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        fit(create_model("teacher_tiny", 3, image_size=32), build_criterion("teacher", teacher_cfg()),
            toy_split(1), toy_split(4), CPU, FitSettings(teacher_cfg(), seed=0, batch_size=16))


def test_an_epoch_saved_but_not_yet_tracked_when_killed_reaches_mlflow_on_resume(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # the run's repository root: no dvc.yaml, no git
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = make_params({"data": {"image_size": 32}, "tracking": {"uri": store},
                          "teacher": {"epochs": 3, "optimizer": "adam", "lr": 3e-3}})
    for split in ("train", "val"):  # the fingerprinted inputs
        (tmp_path / split).mkdir()
    paths = StagePaths(tmp_path / "train", tmp_path / "val", tmp_path / "out", tmp_path / "metrics.json",
                       tmp_path / "resume")
    datasets = (toy_split(48), toy_split(16, seed=1), ["a", "b", "c"])
    log_metrics = Tracker.log_metrics

    def killed_before_epoch_2_reaches_mlflow(tracker, metrics, step=None):
        if step == 2:  # epoch 2's resume state is on disk already
            raise KeyboardInterrupt
        log_metrics(tracker, metrics, step)

    monkeypatch.setattr(Tracker, "log_metrics", killed_before_epoch_2_reaches_mlflow)
    with pytest.raises(KeyboardInterrupt):
        run_training("teacher", params, paths, datasets, CPU)
    monkeypatch.setattr(Tracker, "log_metrics", log_metrics)
    assert run_training("teacher", params, paths, datasets, CPU)["resumed_from"] == 2
    run_id = read_json(paths.out_dir / "run.json")["run_id"]
    history = mlflow.tracking.MlflowClient(store).get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_log_every_logs_running_loss_lines_inside_an_epoch(caplog):
    train, val = toy_split(64), toy_split(16, seed=1)
    cfg = teacher_cfg(epochs=1)
    with caplog.at_level(logging.INFO, logger="hdkd.engine"):
        fit(create_model("teacher_tiny", 3, image_size=32), build_criterion("teacher", cfg), train, val, CPU,
            FitSettings(cfg, seed=0, batch_size=8, log_every=3))
    steps = [m[1] for r in caplog.records if (m := re.search(r" step (\d+/\d+)  loss \d", r.getMessage()))]
    assert steps == ["3/8", "6/8"]


def test_a_non_finite_loss_stops_training_with_a_clear_error():
    train = toy_split(32)
    train.tensors[0][5] = float("nan")  # one corrupt sample poisons its batch's loss
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(create_model("teacher_tiny", 3, image_size=32), build_criterion("teacher", teacher_cfg()),
            train, toy_split(8), CPU, FitSettings(teacher_cfg(), seed=0, batch_size=16))


def test_resume_fingerprint_ignores_exactly_the_params_that_never_change_a_result(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    paths = StagePaths(tmp_path / "train", tmp_path / "val", tmp_path / "out", tmp_path / "m.json", tmp_path / "ck")

    def fingerprint(**sections):
        return input_fingerprint("teacher", make_params(sections), paths)

    base = fingerprint()
    assert fingerprint(train={"num_workers": 4, "log_every": 5}, tracking={"enabled": False}) == base
    assert fingerprint(train={"batch_size": 8}) != base
    assert fingerprint(distill={"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "alpha": 0.9}) != base
