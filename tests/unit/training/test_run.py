import logging
import math
import re

import pytest
import torch

from hdkd.infra.io import read_json
from hdkd.infra.tracking import Tracker
from hdkd.models import create_model
from hdkd.models.checkpoint import save_model
from hdkd.training.engine import (
    FitData,
    FitSettings,
    build_optimizer,
    fit,
    is_better,
    lr_at,
    steps_per_epoch,
    term_grad_norms,
    validate,
)
from hdkd.training.run import StagePaths, build_criterion, input_fingerprint, load_teacher, run_training
from tests.helpers.fit import CPU, interruptible_fit, toy_split
from tests.helpers.params import make_params, section


def tiny_teacher():
    return create_model("teacher_tiny", 3, image_size=32)


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
        model = tiny_teacher()
        return fit(model, build_criterion("teacher", teacher_cfg()), FitData(train, val), CPU,
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
    with caplog.at_level(logging.INFO, logger="hdkd.training.engine"):
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
        return interruptible_fit(tiny_teacher, "teacher", cfg, train, val,
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
    model = tiny_teacher()
    settings = FitSettings(cfg, seed=0, batch_size=16, resume_dir=tmp_path, fingerprint="old")
    fit(model, build_criterion("teacher", cfg), FitData(train, val), CPU, settings)
    with caplog.at_level(logging.INFO):
        result = fit(tiny_teacher(), build_criterion("teacher", cfg), FitData(train, val),
                     CPU, FitSettings(cfg, seed=0, batch_size=16, resume_dir=tmp_path, fingerprint="new"))
    assert result.resumed_from == 0 and "starting afresh" in caplog.text


def test_a_resume_state_saved_at_another_point_of_the_passes_is_ignored(tmp_path, caplog):
    # A state whose epoch ended after other passes than this run's (saved by an engine that validated after
    # every pass, with no record of its passes) would resume the schedule at the wrong step.
    from hdkd.infra.torch_io import load_torch, save_torch

    train, val, cfg = toy_split(16), toy_split(16, seed=1), teacher_cfg(epochs=2)
    with pytest.raises(KeyboardInterrupt):
        interruptible_fit(tiny_teacher, "teacher", cfg, train, val,
                          seed=0, resume_dir=tmp_path, stop_after=1, total_steps=4)
    state = load_torch(tmp_path / "last.pt")
    assert (state["epoch"], state["passes"]) == (1, 2)  # one step per pass, two passes per epoch
    save_torch(tmp_path / "last.pt", {k: v for k, v in state.items() if k != "passes"})
    with caplog.at_level(logging.INFO):
        result, _ = interruptible_fit(tiny_teacher, "teacher", cfg, train, val, seed=0, resume_dir=tmp_path,
                                      total_steps=4)
    assert result.resumed_from == 0 and "another point of the run's passes" in caplog.text
    assert len(result.history) == 2


def test_a_corrupt_best_checkpoint_is_discarded_with_the_rest_of_the_resume_state(tmp_path, caplog):
    train, val = toy_split(32), toy_split(16, seed=1)

    def run(epochs):
        cfg = teacher_cfg(epochs=epochs)
        return fit(tiny_teacher(), build_criterion("teacher", cfg), FitData(train, val), CPU,
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
    save_model(teacher_path, tiny_teacher(), "teacher_tiny", ["a", "b", "c"], 32, {})
    student = create_model("hdkd_tiny", 3, image_size=32)
    cfg = section("distill", epochs=1, optimizer="adamw", lr=1e-3, weight_decay=0.0, schedule="none", alpha=0.5,
                  **{"lambda": 10.0})
    teacher = load_teacher(teacher_path, ["a", "b", "c"], student, cfg.stages, "cpu")
    rows = []
    fit(student, build_criterion("hdkd", cfg), FitData(train, val), CPU, FitSettings(cfg, seed=0, batch_size=16),
        teacher=teacher, on_epoch=rows.append)
    (row,) = rows
    assert row["train_ce"] > 0 and row["train_logit_kd"] > 0 and row["train_feature_kd"] > 0
    assert math.isclose(row["train_loss"], 0.5 * row["train_ce"] + 0.5 * row["train_logit_kd"]
                        + 10 * row["train_feature_kd"], rel_tol=1e-6)
    # Each weighted term, and the gradient norm it sends into the shared trunk.
    terms = ["ce", "kd", "feature_stage1", "feature_stage2", "feature_stage3"]
    assert math.isclose(sum(row[f"loss_{t}"] for t in terms), row["train_loss"], rel_tol=1e-6)
    assert math.isclose(row["loss_ce"], 0.5 * row["train_ce"], rel_tol=1e-6)
    assert all(row[f"grad_norm_{t}"] > 0 for t in terms)
    # The share of validation predictions per class (no names given: the class index).
    shares = [row[f"val_pred_{k}"] for k in range(3)]
    assert math.isclose(sum(shares), 1.0) and all(0 <= v <= 1 for v in shares)


def test_term_grad_norms_are_the_norms_of_each_terms_gradient_alone():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    other = torch.nn.Parameter(torch.tensor([0.5]))
    terms = {"linear": (w * torch.tensor([3.0, 4.0, 0.0])).sum(), "square": (w ** 2).sum() + other.sum(),
             "unrelated": other.sum() * 2}
    norms = term_grad_norms(terms, [w])
    assert norms["linear"].item() == pytest.approx(5.0)  # |(3, 4, 0)|
    assert norms["square"].item() == pytest.approx(2 * math.sqrt(1 + 4 + 9))  # |2w|
    assert norms["unrelated"].item() == 0.0  # no path into w
    assert w.grad is None and other.grad is None  # nothing accumulated: the step's backward is untouched


def test_gradient_probes_leave_the_training_unchanged():
    train, val = toy_split(48), toy_split(16, seed=1)
    cfg = teacher_cfg(epochs=2)
    weights, rows = [], []
    for probes in (0, 2):
        torch.manual_seed(0)
        model = tiny_teacher()
        result = fit(model, build_criterion("teacher", cfg), FitData(train, val), CPU,
                     FitSettings(cfg, seed=0, batch_size=16, grad_probes=probes))
        weights.append(model.state_dict())
        rows.append(result.history[-1])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "grad_norm_ce" not in rows[0] and rows[1]["grad_norm_ce"] > 0
    assert rows[0]["train_loss"] == rows[1]["train_loss"]


@pytest.mark.parametrize("n,batch,world", [(48, 16, 1), (50, 16, 1), (10, 16, 1), (51, 16, 2), (7, 4, 2), (33, 8, 4)])
def test_steps_per_epoch_is_the_length_of_fits_loader(n, batch, world):
    from torch.utils.data import DataLoader, DistributedSampler

    data = list(range(n))
    sampler = DistributedSampler(data, num_replicas=world, rank=0, shuffle=False)
    loader = DataLoader(data, batch_size=batch // world, sampler=sampler, drop_last=n // world >= batch // world)
    assert steps_per_epoch(n, batch, world) == len(loader)


def test_a_step_budget_trains_every_set_size_for_the_same_optimizer_steps():
    cfg = section("student", epochs=3, optimizer="adamw", lr=2e-3, schedule="cosine", warmup_epochs=1,
                  warmup_lr=1e-4, min_lr=1e-5)
    val = toy_split(16, seed=1)
    seen = {}
    for n in (64, 16):  # 4 and 1 steps per pass at batch 16
        steps, lrs = [], []

        def hook(images, steps=steps):
            steps.append(len(images))
            return images

        torch.manual_seed(0)
        model = create_model("student_tiny", 3, image_size=32)
        result = fit(model, build_criterion("student", cfg), FitData(toy_split(n), val, batch_hook=hook), CPU,
                     FitSettings(cfg, seed=0, batch_size=16, total_steps=12),
                     on_epoch=lambda row, lrs=lrs: lrs.append(row["lr"]))
        seen[n] = (len(steps), len(result.history), lrs)
    # The same steps; more, shorter passes, validated as often: once per epoch of the schedule.
    assert seen[64][:2] == (12, 3) and seen[16][:2] == (12, 3)
    # The schedule runs over the steps, not the passes: each epoch begins with the same learning rate.
    assert seen[16][2] == pytest.approx(seen[64][2])
    # Without a budget: the recipe's epochs over the set itself.
    torch.manual_seed(0)
    result = fit(create_model("student_tiny", 3, image_size=32), build_criterion("student", cfg), FitData(toy_split(16), val),
                 CPU, FitSettings(cfg, seed=0, batch_size=16))
    assert len(result.history) == 3


@pytest.mark.parametrize("images", [48, 16], ids=["passes-of-3-steps", "passes-of-1-step"])
def test_a_step_budget_stops_mid_pass_and_resumes_to_the_same_weights(images, tmp_path):
    cfg = teacher_cfg(epochs=3)
    train, val = toy_split(images), toy_split(16, seed=1)

    def run(resume_dir, stop_after=None):
        return interruptible_fit(tiny_teacher, "teacher", cfg, train, val,
                                 seed=0, resume_dir=resume_dir, stop_after=stop_after, total_steps=7)

    whole, model = run(None)
    # 7 steps, an epoch of the schedule every 7/3: validated after passes 1, 2, 3 of 3 + 3 + 1 steps, or after
    # passes 3, 5, 7 of one step each (the rows a kill after the second leaves span several passes)
    assert len(whole.history) == 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=2)
    resumed, model2 = run(tmp_path)
    assert resumed.resumed_from == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


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
        fit(tiny_teacher(), build_criterion("teacher", teacher_cfg()),
            FitData(toy_split(1), toy_split(4)), CPU, FitSettings(teacher_cfg(), seed=0, batch_size=16))


def test_an_epoch_saved_but_not_yet_tracked_when_killed_reaches_mlflow_on_resume(tmp_path, monkeypatch):
    import mlflow
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
    run_id = read_json(paths.run_record)["run_id"]
    history = mlflow.tracking.MlflowClient(store).get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_log_every_logs_running_loss_lines_inside_an_epoch(caplog):
    train, val = toy_split(64), toy_split(16, seed=1)
    cfg = teacher_cfg(epochs=1)
    with caplog.at_level(logging.INFO, logger="hdkd.training.engine"):
        fit(tiny_teacher(), build_criterion("teacher", cfg), FitData(train, val), CPU,
            FitSettings(cfg, seed=0, batch_size=8, log_every=3))
    steps = [m[1] for r in caplog.records if (m := re.search(r" step (\d+/\d+)  loss \d", r.getMessage()))]
    assert steps == ["3/8", "6/8"]


def test_a_non_finite_loss_stops_training_with_a_clear_error():
    train = toy_split(32)
    train.tensors[0][5] = float("nan")  # one corrupt sample poisons its batch's loss
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(tiny_teacher(), build_criterion("teacher", teacher_cfg()),
            FitData(train, toy_split(8)), CPU, FitSettings(teacher_cfg(), seed=0, batch_size=16))


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


# ----------------------------------------------------------------------------- the order of one run
def _one_run(tmp_path, epochs=2):
    """A tiny run of the teacher, untracked: its params, paths and datasets."""
    params = make_params({"data": {"image_size": 32}, "tracking": {"enabled": False},
                          "teacher": {"epochs": epochs, "optimizer": "adam", "lr": 3e-3}})
    for split in ("train", "val"):  # the fingerprinted inputs
        (tmp_path / split).mkdir(exist_ok=True)
    paths = StagePaths(tmp_path / "train", tmp_path / "val", tmp_path / "out", tmp_path / "metrics.json",
                       tmp_path / "resume")
    return params, paths, (toy_split(48), toy_split(16, seed=1), ["a", "b", "c"])


def test_an_mlflow_run_is_resumed_only_for_the_same_inputs(tmp_path, monkeypatch):
    import hdkd.training.run as run_module

    params, paths, datasets = _one_run(tmp_path)
    fingerprint = input_fingerprint("teacher", params, paths, (params.seed, 1.0))
    paths.resume_dir.mkdir()
    write = (paths.resume_dir / run_module.MLFLOW_RUN).write_text
    seen = []

    class Recording(Tracker):
        def __init__(self, *args, resume_run_id=None, **kwargs):
            seen.append(resume_run_id)
            super().__init__(*args, resume_run_id=resume_run_id, **kwargs)

    monkeypatch.setattr(run_module, "Tracker", Recording)
    write('{"fingerprint": "other inputs", "run_id": "stale"}')
    with pytest.raises(RuntimeError, match="stop"):  # stopped in the first epoch: the record is still there
        monkeypatch.setattr(run_module, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
        run_training("teacher", params, paths, datasets, CPU)
    write(f'{{"fingerprint": "{fingerprint}", "run_id": "same"}}')
    with pytest.raises(RuntimeError, match="stop"):
        run_training("teacher", params, paths, datasets, CPU)
    assert seen == [None, "same"]


def test_a_runs_files_are_in_place_before_mlflow_hears_of_it(tmp_path, monkeypatch):
    import hdkd.training.run as run_module

    params, paths, datasets = _one_run(tmp_path)
    files = [paths.out_dir / "model.pt", paths.run_record, paths.metrics]

    def tracking_crashes(*args):
        assert all(f.is_file() for f in files), "MLflow was told before the run's files were written"
        raise RuntimeError("the tracking server fell over")

    monkeypatch.setattr(run_module, "track_run", tracking_crashes)
    with pytest.raises(RuntimeError, match="fell over"):
        run_training("teacher", params, paths, datasets, CPU)
    assert all(f.is_file() for f in files)
    assert (paths.resume_dir / "last.pt").is_file()  # not finished: still resumable


def test_a_runs_resume_state_is_removed_last_and_only_once_its_files_are_written(tmp_path, monkeypatch):
    import hdkd.training.run as run_module

    params, paths, datasets = _one_run(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "save_model", disk_full)
    with pytest.raises(OSError, match="(?i)no space left on device"):
        run_training("teacher", params, paths, datasets, CPU)
    assert (paths.resume_dir / "last.pt").is_file()  # nothing lost
    assert not any(f.is_file() for f in (paths.out_dir / "model.pt", paths.run_record, paths.metrics))
    monkeypatch.setattr(run_module, "save_model", save_model)
    done = run_training("teacher", params, paths, datasets, CPU)
    assert done["resumed_from"] == 2  # both epochs kept: nothing trained again
    assert (paths.out_dir / "model.pt").is_file() and not paths.resume_dir.exists()
