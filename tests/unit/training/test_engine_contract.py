"""The training loop's contract (hdkd.training.engine), on a linear classifier: what each pass's row reports is
what was trained, the optimizer steps and images each pass takes, the learning rate a row names, what gradient
clipping bounds, which weights a fit returns, and the errors of data it cannot train on.
(tests/unit/training/test_run.py and test_properties.py hold the schedule, resume and budget across networks.)"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hdkd.training.engine import FitData, FitSettings, build_optimizer, fit, lr_at, probe_steps, validation_rounds
from hdkd.training.run import build_criterion
from tests.helpers.fit import CPU
from tests.helpers.params import section


class Linear(nn.Module):
    """A linear classifier with the paper's networks' interface (logits, and its stage maps when asked)."""

    def __init__(self, features=6, classes=3):
        torch.manual_seed(0)  # the same initial weights whatever ran before
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(features, features)])
        self.head = nn.Linear(features, classes)

    def forward(self, x, return_features=False):
        h = self.stages[0](x)
        logits = self.head(h)
        if not return_features:
            return logits
        return logits, [h]


def data(n, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, features, generator=g)
    x[torch.arange(n), labels] += 2.0
    return TensorDataset(x, labels)


def cfg(**kw):
    return section("teacher", **{"epochs": 3, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0,
                                 "schedule": "none", "warmup_epochs": 0, **kw})


def run_fit(model, train, val, optim=None, **settings):
    optim = optim or cfg()
    rows, seen = [], []

    def hook(images):  # every training batch the loop steps on, as it trains on it
        seen.append(images.shape[0])
        return images

    torch.manual_seed(0)
    result = fit(model, build_criterion("teacher", optim), FitData(train, val, batch_hook=hook), CPU,
                 FitSettings(optim, seed=0, batch_size=settings.pop("batch_size", 4), **settings),
                 on_epoch=lambda row: rows.append(row))
    return result, rows, seen


def test_each_pass_reports_the_loss_and_accuracy_of_the_batches_it_trained_on_per_image():
    model, captured = Linear(), []
    model.register_forward_hook(lambda m, args, out: captured.append((out[0].detach(), args[0])) if m.training
                                else None)
    train = data(10)
    labels_of = {tuple(x.tolist()): int(y) for x, y in zip(*train.tensors, strict=True)}
    result, rows, seen = run_fit(model, train, data(6, seed=1), cfg(epochs=2), batch_size=4, grad_probes=0)
    assert seen == [4, 4, 4, 4]  # the partial last batch dropped (a full one fits)
    per_pass = [captured[:2], captured[2:]]
    for row, batches in zip(rows, per_pass, strict=True):
        logits = torch.cat([b[0] for b in batches])
        labels = torch.tensor([labels_of[tuple(x.tolist())] for b in batches for x in b[1]])
        assert row["train_loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
        assert row["train_ce"] == pytest.approx(row["train_loss"], rel=1e-9)
        assert row["train_accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
        assert row["train_logit_kd"] == row["train_feature_kd"] == 0.0
        assert row["images_per_s"] == pytest.approx(8 / row["epoch_time_s"])


def test_a_partial_last_batch_is_dropped_when_a_full_batch_fits():
    _, _, seen = run_fit(Linear(), data(9), data(6, seed=1), cfg(epochs=2), batch_size=4)
    assert seen == [4, 4, 4, 4]  # a last batch of one would break BatchNorm in training mode
    _, _, seen = run_fit(Linear(), data(3), data(6, seed=1), cfg(epochs=2), batch_size=4)
    assert seen == [3, 3]  # no full batch fits: the one partial batch is the pass


def test_a_step_budget_takes_exactly_its_steps_the_last_pass_cut_short_validated_once_per_schedule_epoch():
    result, rows, seen = run_fit(Linear(), data(12), data(6, seed=1), cfg(epochs=1), batch_size=4, total_steps=8)
    assert len(seen) == 8 and [r["epoch"] for r in rows] == [1]  # 3 + 3 + 2 steps, one epoch of the schedule
    assert len(result.history) == 1
    # two epochs of 4 steps: the first ends in the second pass, which the first validation follows
    _, rows, seen = run_fit(Linear(), data(12), data(6, seed=1), cfg(epochs=2), batch_size=4, total_steps=8)
    assert len(seen) == 8 and [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["images_per_s"] == pytest.approx(6 * 4 / rows[0]["epoch_time_s"])  # its row: both passes
    assert rows[1]["images_per_s"] == pytest.approx(2 * 4 / rows[1]["epoch_time_s"])


@pytest.mark.parametrize(("total", "per_pass", "epochs", "rounds"), [
    (9, 3, 3, [[0], [1], [2]]),                     # whole data: one pass per epoch, as without a budget
    (9, 1, 3, [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),   # a third of it: three passes per epoch
    (8, 3, 2, [[0, 1], [2]]),                       # the epoch ends mid-pass: validated after that pass
    (8, 3, 4, [[0], [1], [2]]),                     # a pass past two epochs' ends: one validation
    (7, 2, 3, [[0, 1], [2], [3]]),                  # epochs end at steps 7/3, 14/3, 7: after steps 4, 6, 7
    (5, 7, 3, [[0]]),                               # a budget shorter than a pass
])
def test_validation_follows_the_first_pass_reaching_each_epoch_of_the_schedule(total, per_pass, epochs, rounds):
    assert [list(r) for r in validation_rounds(total, per_pass, epochs)] == rounds


def test_an_epoch_of_several_passes_reports_the_loss_and_accuracy_of_all_its_batches():
    model, captured = Linear(), []
    model.register_forward_hook(lambda m, args, out: captured.append((out[0].detach(), args[0])) if m.training
                                else None)
    train = data(4)  # one batch per pass: 3 passes per epoch of the schedule
    labels_of = {tuple(x.tolist()): int(y) for x, y in zip(*train.tensors, strict=True)}
    _, rows, seen = run_fit(model, train, data(6, seed=1), cfg(epochs=2), batch_size=4, grad_probes=0, total_steps=6)
    assert seen == [4] * 6 and len(rows) == 2
    for row, batches in zip(rows, [captured[:3], captured[3:]], strict=True):
        logits = torch.cat([b[0] for b in batches])
        labels = torch.tensor([labels_of[tuple(x.tolist())] for b in batches for x in b[1]])
        assert row["train_loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
        assert row["train_accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_each_row_names_the_learning_rate_its_pass_began_with():
    optim = cfg(epochs=4, optimizer="adamw", lr=0.01, schedule="cosine", warmup_epochs=1, warmup_lr=0.001,
                min_lr=0.0001)
    _, rows, _ = run_fit(Linear(), data(12), data(6, seed=1), optim, batch_size=4)
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(optim, e) for e in range(4)], rel=1e-9)
    _, rows, _ = run_fit(Linear(), data(12), data(6, seed=1), optim, batch_size=4, total_steps=24)
    # under a budget of 24 steps the 4 epochs of the schedule span 24 steps, 8 passes of 3, two per row
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(optim, e) for e in range(4)], rel=1e-9)


def test_the_fit_returns_the_weights_of_the_best_validation_pass_accuracy_first_then_loss():
    torch.manual_seed(0)
    model, states = Linear(), []
    optim = cfg(epochs=6, lr=0.3)  # large steps: validation rises, then falls
    result = fit(model, build_criterion("teacher", optim), FitData(data(12), data(5, seed=1)), CPU,
                 FitSettings(optim, seed=0, batch_size=4), on_epoch=lambda row: states.append(copy.deepcopy(
                     model.state_dict())))
    accuracy = [r["val_accuracy"] for r in result.history]
    loss = [r["val_loss"] for r in result.history]
    # passes 2 and 3 are the most accurate, pass 3 with the lower loss; the later passes fall back
    assert accuracy[1] == accuracy[2] == max(accuracy) > max(accuracy[3:]) and loss[2] < loss[1]
    assert result.best_epoch == 3
    assert result.best == {k: result.history[2][k] for k in ("epoch", "val_accuracy", "val_loss")}
    assert all(torch.equal(v, states[2][k]) for k, v in model.state_dict().items())
    assert result.resumed_from == 0


def test_gradient_clipping_bounds_each_steps_gradient_norm():
    model = Linear()
    before = copy.deepcopy(model.state_dict())
    optim = cfg(epochs=1, lr=1.0)  # SGD without momentum: a step moves the weights by lr x the clipped gradient
    run_fit(model, data(4), data(4, seed=1), optim, batch_size=4, grad_clip=0.01)
    moved = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before])
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-4)  # one step, its gradient far above the bound
    unclipped = Linear()
    unclipped.load_state_dict(before)
    run_fit(unclipped, data(4), data(4, seed=1), optim, batch_size=4)
    assert torch.cat([(unclipped.state_dict()[k] - before[k]).flatten() for k in before]).norm() > 0.1


@pytest.mark.parametrize(("optimizer", "kind"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                                 ("sgd", torch.optim.SGD)])
def test_the_optimizer_is_the_one_the_recipe_names_with_its_settings(optimizer, kind):
    built = build_optimizer(Linear(), cfg(optimizer=optimizer, lr=0.003, weight_decay=0.1, momentum=0.8))
    assert type(built) is kind
    assert [g["lr"] for g in built.param_groups] == [0.003, 0.003]
    assert [g["weight_decay"] for g in built.param_groups] == [0.1, 0.0]  # biases take none
    if optimizer == "sgd":
        assert [g["momentum"] for g in built.param_groups] == [0.8, 0.8]


def test_frozen_parameters_are_left_out_of_the_optimizer():
    model = Linear()
    model.stages.requires_grad_(False)
    built = build_optimizer(model, cfg())
    assert sum(len(g["params"]) for g in built.param_groups) == 2  # the head's weight and bias


@pytest.mark.parametrize(("steps", "probes", "expected"), [(10, 2, {1, 6}), (9, 3, {1, 4, 7}), (10, 3, {1, 4, 7}), (1, 2, {1}),
                                                           (3, 0, set()), (4, 4, {1, 2, 3, 4})])
def test_the_probed_steps_are_evenly_spaced_from_the_first(steps, probes, expected):
    assert probe_steps(steps, probes) == expected


def test_probed_passes_report_the_mean_gradient_norm_of_each_term_over_their_probes():
    _, rows, _ = run_fit(Linear(), data(12), data(6, seed=1), cfg(epochs=1), batch_size=4, grad_probes=2)
    assert rows[0]["grad_norm_ce"] > 0 and math.isfinite(rows[0]["grad_norm_ce"])
    _, rows, _ = run_fit(Linear(), data(12), data(6, seed=1), cfg(epochs=1), batch_size=4, grad_probes=0)
    assert not any(k.startswith("grad_norm_") for k in rows[0])


def test_data_it_cannot_train_on_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"the training split has 1 samples: BatchNorm needs at least 2"):
        run_fit(Linear(), data(1), data(4, seed=1), batch_size=4)


def test_the_runtime_runs_under_the_precision_and_memory_format_asked_for():
    from hdkd.training.engine import Runtime

    a = torch.randn(4, 4)
    with Runtime(torch.device("cpu")).autocast():
        assert (a @ a).dtype == torch.float32  # full precision unless asked
    with Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16).autocast():
        assert (a @ a).dtype == torch.bfloat16
    images, labels = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    moved, same = Runtime(torch.device("cpu"), channels_last=True).to_device(images, labels)
    assert moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, images)
    assert torch.equal(same, labels)
    plain, _ = Runtime(torch.device("cpu")).to_device(images, labels)
    assert plain.is_contiguous()


def test_seed_everything_fixes_every_generator_a_run_draws_from():
    import random

    import numpy as np

    from hdkd.training.engine import seed_everything

    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    seed_everything(8)
    assert draws[0] == draws[1] and all(a != b for a, b in zip(draws[0], (random.random(), np.random.rand(),
                                                                          torch.rand(1).item()), strict=True))


def test_validation_names_the_prediction_shares_by_class_index_without_names():
    from torch.utils.data import DataLoader

    from hdkd.training.engine import validate

    row = validate(Linear(), DataLoader(data(6, seed=1), batch_size=4), CPU)
    assert sorted(k for k in row if k.startswith("val_pred_")) == ["val_pred_0", "val_pred_1", "val_pred_2"]
    assert sum(row[f"val_pred_{i}"] for i in range(3)) == pytest.approx(1.0)


class Stages(nn.Module):
    """Two tanh-linear stages (their maps 6 channels of 1 x 1) and a class head, or two heads (HDKD's class and distillation heads, both returned in
    training, averaged in evaluation); its stage maps when asked, or always (``features``: a teacher's interface)."""

    def __init__(self, seed=0, heads=1, features=False):
        torch.manual_seed(seed)
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.heads = nn.ModuleList([nn.Linear(6, 3) for _ in range(heads)])
        self.features = features

    def forward(self, x, return_features=False):
        feats = []
        for stage in self.stages:
            x = torch.tanh(stage(x))
            feats.append(x[:, :, None, None])  # a 1 x 1 map of 6 channels
        out = tuple(head(x) for head in self.heads)
        out = out[0] if len(out) == 1 else (out if self.training else sum(out) / len(out))
        return (out, feats) if return_features or self.features else out


def distill_cfg(**kw):
    return section("distill", **{"epochs": 1, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
                                 "schedule": "none", "warmup_epochs": 0, "type": "soft", "alpha": 0.4, "tau": 2.0,
                                 "lambda": 3.0, "beta": 1.0, "stages": [1, 2], **kw})


def one_pass(model, criterion, optim, loader, rt=CPU, steps=None, teacher=None, desc="pass", grad_probes=0,
             **settings):
    """:func:`train_one_epoch` over ``loader`` with a fresh optimiser of ``optim`` at learning rate 0: the weights
    stay put, so what each step saw can be computed again afterwards."""
    from hdkd.training.engine import Epoch, Optimisation, build_scheduler, train_one_epoch

    optimizer = build_optimizer(model, optim)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    total = steps or len(loader)
    opt = Optimisation(optimizer, build_scheduler(optimizer, optim, total), torch.amp.GradScaler("cuda", enabled=False))
    return train_one_epoch(model, criterion, opt, Epoch(loader, desc, steps), rt,
                           FitSettings(optim, seed=0, batch_size=loader.batch_size, grad_probes=grad_probes,
                                       **settings), teacher)


def expected_means(model, criterion, teacher, batches):
    """Per image over ``batches``: each loss part, each weighted term and the class head's accuracy, by hand."""
    sums, n = {}, 0
    for x, y in batches:
        outputs, feats = model(x, return_features=True)
        t_logits, t_feats = teacher(x)
        parts = criterion(outputs, y, t_logits, feats, t_feats)
        head = outputs[0] if isinstance(outputs, tuple) else outputs
        values = {"train_loss": parts.total, "train_ce": parts.ce, "train_logit_kd": parts.logit_kd,
                  "train_feature_kd": parts.feature, "train_accuracy": (head.argmax(1) == y).double().mean(),
                  **{f"loss_{k}": v for k, v in parts.terms.items()}}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(y)
        n += len(y)
    return {k: v / n for k, v in sums.items()}


def test_a_distilling_pass_reports_the_per_image_mean_of_each_loss_part_and_term_of_the_batches_it_stepped_on():
    from torch.utils.data import DataLoader

    student, teacher = Stages(0, heads=2), Stages(1, features=True)
    optim = distill_cfg()
    criterion = build_criterion("hdkd", optim)
    train = data(12)
    row = one_pass(student, criterion, optim, DataLoader(train, batch_size=4), steps=2, teacher=teacher)
    batches = [(train.tensors[0][i:i + 4], train.tensors[1][i:i + 4]) for i in (0, 4)]  # the 2 steps' batches
    with torch.no_grad():
        expected = expected_means(student.train(), criterion, teacher, batches)
    assert set(expected) == {"train_loss", "train_ce", "train_logit_kd", "train_feature_kd", "train_accuracy",
                             "loss_ce", "loss_kd", "loss_feature_stage1", "loss_feature_stage2"}
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert 0 < expected["train_logit_kd"] and 0 < expected["train_feature_kd"]  # every part is there to see
    # one image a step: the mean of a single image is that image's loss
    row = one_pass(student, criterion, optim, DataLoader(train, batch_size=1), steps=1, teacher=teacher)
    with torch.no_grad():
        expected = expected_means(student.train(), criterion, teacher, [(train.tensors[0][:1], train.tensors[1][:1])])
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_a_passs_time_and_throughput_are_its_own():
    import time

    from torch.utils.data import DataLoader

    before = time.perf_counter()
    row = one_pass(Linear(), build_criterion("teacher", cfg()), cfg(), DataLoader(data(12), batch_size=4))
    assert 0 < row["epoch_time_s"] <= time.perf_counter() - before
    assert row["images_per_s"] == pytest.approx(12 / row["epoch_time_s"], rel=1e-12)


def test_probed_steps_report_the_mean_of_each_terms_gradient_norm_into_the_trunk(monkeypatch):
    from torch.utils.data import DataLoader

    import hdkd.training.engine as engine

    norms = iter([{"ce": torch.tensor(3.0), "kd": torch.tensor(1.0)}, {"ce": torch.tensor(5.0), "kd": torch.tensor(2.0)}])
    probed_with = []

    def fake_norms(terms, params):
        probed_with.append((sorted(terms), params))
        return next(norms)

    monkeypatch.setattr(engine, "term_grad_norms", fake_norms)
    student, teacher = Stages(0, heads=2), Stages(1, features=True)
    optim = distill_cfg()
    row = one_pass(student, build_criterion("hdkd", optim), optim, DataLoader(data(16), batch_size=4),
                   teacher=teacher, grad_probes=2)
    assert row["grad_norm_ce"] == pytest.approx(4.0) and row["grad_norm_kd"] == pytest.approx(1.5)
    trunk = [p for p in student.stages.parameters()]
    assert [t for t, _ in probed_with] == [["ce", "feature_stage1", "feature_stage2", "kd"]] * 2
    assert all(len(p) == len(trunk) and all(a is b for a, b in zip(p, trunk, strict=True)) for _, p in probed_with)


def test_log_lines_inside_a_pass_give_the_running_mean_loss_every_log_every_steps_on_rank_0(caplog):
    from torch.utils.data import DataLoader

    from hdkd.infra.distributed import DistInfo
    from hdkd.training.engine import Runtime

    model, train = Linear(), data(20)
    criterion, optim = build_criterion("teacher", cfg()), cfg()
    with caplog.at_level(logging.INFO, logger="hdkd.training.engine"):
        one_pass(model, criterion, optim, DataLoader(train, batch_size=4), log_every=2, desc="teacher 1/3")
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(train.tensors[0][i:i + 4]), train.tensors[1][i:i + 4]).item()
                  for i in range(0, 20, 4)]
    assert caplog.messages == [f"teacher 1/3 step {s}/5  loss {sum(losses[:s]) / s:.4f}  lr 0.00e+00" for s in (2, 4)]
    caplog.clear()
    other_rank = Runtime(torch.device("cpu"), DistInfo(rank=1), progress=False)
    with caplog.at_level(logging.INFO, logger="hdkd.training.engine"):
        one_pass(model, criterion, optim, DataLoader(train, batch_size=4), rt=other_rank, log_every=2)
    assert caplog.messages == []


class Bar:
    """A stand-in for tqdm that records how the pass drives its progress bar."""

    made: list = []

    def __init__(self, iterable, **kwargs):
        self.iterable, self.kwargs, self.postfix, self.closed = iterable, kwargs, [], False
        Bar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        self.postfix.append(kwargs)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("progress", [True, False])
def test_the_progress_bar_names_the_pass_counts_its_steps_and_shows_loss_and_lr_every_twentieth(monkeypatch,
                                                                                                progress):
    from torch.utils.data import DataLoader

    import hdkd.training.engine as engine
    from hdkd.training.engine import Runtime

    Bar.made = []
    monkeypatch.setattr(engine, "tqdm", Bar)
    model, optim = Linear(), cfg()
    one_pass(model, build_criterion("teacher", optim), optim, DataLoader(data(45), batch_size=1), steps=43,
             rt=Runtime(torch.device("cpu"), progress=progress), desc="student 2/8")
    (bar,) = Bar.made
    # disable=None: a bar only on a terminal (not in DVC's or CI's logs); never when the runtime shows none
    assert bar.kwargs == {"desc": "student 2/8", "total": 43, "leave": False, "disable": None if progress else True,
                          "dynamic_ncols": True}
    assert len(bar.postfix) == 22 and bar.closed  # every 43 // 20 = 2 steps, and the last
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x[None]), y[None]).item() for x, y in zip(*data(45).tensors)]
    assert bar.postfix[0] == {"loss": f"{sum(losses[:2]) / 2:.4f}", "lr": "0.00e+00"}
    assert bar.postfix[-1] == {"loss": f"{sum(losses[:43]) / 43:.4f}", "lr": "0.00e+00"}
    for steps, updates in ((40, 20), (3, 3)):  # every 40 // 20 steps; a short pass: every step
        Bar.made = []
        one_pass(model, build_criterion("teacher", optim), optim, DataLoader(data(45), batch_size=1), steps=steps)
        assert len(Bar.made[0].postfix) == updates


def test_a_loss_that_is_not_finite_stops_the_pass_naming_it_and_what_to_do():
    from torch.utils.data import DataLoader

    x, y = data(8).tensors
    x = x.clone()
    x[5] = float("nan")  # one image of the second batch
    optim = cfg()
    with pytest.raises(FloatingPointError) as e:
        one_pass(Linear(), build_criterion("teacher", optim), optim, DataLoader(TensorDataset(x, y), batch_size=4),
                 desc="teacher 3/8")
    assert str(e.value) == ("loss became nan (teacher 3/8, by step 2); lower the learning rate or check the data "
                            "(train.grad_clip can help)")


@pytest.mark.parametrize(("world", "batch_size"), [(1, 4), (1, 6), (2, 4), (2, 6), (3, 6)])  # divisible: fit's rule
def test_the_steps_of_a_pass_are_those_of_the_loader_fit_builds(world, batch_size):
    from torch.utils.data import DataLoader, DistributedSampler

    from hdkd.training.engine import steps_per_epoch

    for n in range(1, 30):
        train = data(n)
        loader = DataLoader(train, batch_size=batch_size // world,
                            sampler=DistributedSampler(train, num_replicas=world, rank=0, shuffle=False),
                            drop_last=n // world >= batch_size // world)
        steps = steps_per_epoch(n, batch_size, world)
        assert type(steps) is int and steps == len(loader), (n, batch_size, world)
        if world == 1:
            assert steps_per_epoch(n, batch_size) == len(loader)  # one process unless told


def test_weight_decay_falls_on_weight_matrices_and_kernels_not_on_biases_norms_and_scalars():
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "norm": nn.LayerNorm(4), "linear": nn.Linear(4, 2)})
    model.register_parameter("temperature", nn.Parameter(torch.tensor(1.0)))
    decay, no_decay = build_optimizer(model, cfg(weight_decay=0.1)).param_groups
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(named[id(p)] for p in decay["params"]) == ["conv.weight", "linear.weight"]
    assert sorted(named[id(p)] for p in no_decay["params"]) == ["conv.bias", "linear.bias", "norm.bias",
                                                                 "norm.weight", "temperature"]


def test_a_pass_is_better_by_accuracy_then_by_lower_loss_and_an_equal_one_is_not():
    from hdkd.training.engine import is_better

    best = {"val_accuracy": 0.8, "val_loss": 0.5}
    assert is_better(best, None)
    assert is_better({"val_accuracy": 0.9, "val_loss": 0.9}, best)
    assert not is_better({"val_accuracy": 0.7, "val_loss": 0.1}, best)
    assert is_better({"val_accuracy": 0.8, "val_loss": 0.4}, best)
    assert not is_better({"val_accuracy": 0.8, "val_loss": 0.6}, best)
    assert not is_better(dict(best), best)  # a tie keeps the earlier pass


def test_the_schedule_ends_at_the_minimum_and_stays_there():
    optim = cfg(epochs=4, schedule="cosine", warmup_epochs=1, warmup_lr=0.001, min_lr=0.0001, lr=0.01)
    assert lr_at(optim, 4.0) == pytest.approx(0.0001, rel=1e-12)
    assert lr_at(optim, 5.5) == pytest.approx(0.0001, rel=1e-12)  # past its epochs (a rounded budget)


def test_seeds_beyond_numpys_range_seed_numpy_by_their_remainder_and_distinct_seeds_draw_differently():
    import numpy as np

    from hdkd.training.engine import seed_everything

    def numpy_draw(seed):
        seed_everything(seed)
        return np.random.rand()

    assert numpy_draw(2**32 + 5) == numpy_draw(5)
    assert len({numpy_draw(s) for s in (7, 9, 39, 2**31 + 7)}) == 4


def test_a_term_that_does_not_reach_the_trunk_has_gradient_norm_zero_on_its_device():
    from hdkd.training.engine import term_grad_norms

    trunk, head = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    norms = term_grad_norms({"a": (trunk * 2).sum(), "b": (head ** 2).sum()}, [trunk])
    assert norms["a"].item() == pytest.approx(2 * math.sqrt(3))
    assert norms["b"].shape == () and norms["b"].item() == 0.0
    on_meta = nn.Parameter(torch.randn(3, device="meta"))  # a device other than the CPU, on every machine
    assert term_grad_norms({"b": (on_meta ** 2).sum()}, [nn.Parameter(torch.randn(3, device="meta"))])[
        "b"].device.type == "meta"


def test_the_trunk_is_the_shared_stages_of_the_papers_networks_or_a_whole_baseline():
    from hdkd.training.engine import trunk_parameters

    model = Stages(0)
    model.stages[1].bias.requires_grad_(False)
    assert [id(p) for p in trunk_parameters(model)] == [id(model.stages[0].weight), id(model.stages[0].bias),
                                                        id(model.stages[1].weight)]
    baseline = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # no stages: every trainable parameter
    assert [id(p) for p in trunk_parameters(baseline)] == [id(p) for p in baseline.parameters()]


def test_the_runtime_runs_under_the_half_precision_asked_for_and_puts_batches_on_its_device():
    from hdkd.training.engine import Runtime

    a = torch.randn(4, 4)
    with Runtime(torch.device("cpu"), amp_dtype=torch.float16).autocast():
        assert (a @ a).dtype == torch.float16  # not autocast's own default for the CPU (bfloat16)
    images, labels = Runtime(torch.device("meta")).to_device(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    assert images.device.type == labels.device.type == "meta"


class Dropout(Linear):
    """:class:`Linear` with dropout on its stage: each training step draws from torch's generator."""

    def forward(self, x, return_features=False):
        h = nn.functional.dropout(self.stages[0](x), 0.3, self.training)
        logits = self.head(h)
        return (logits, [h]) if return_features else logits


def aligned_criterion():
    from hdkd.training.losses import AlignedFeatureDistillationLoss, HDKDLoss, LogitDistillationLoss

    torch.manual_seed(1)  # the projectors' initial weights
    return HDKDLoss(LogitDistillationLoss("soft", 0.4, 2.0), AlignedFeatureDistillationLoss((6, 6), (1, 2)), 3.0)


METHODS = {  # a network alone (cross-entropy), and one distilled through a loss with parameters of its own
    "alone": (Dropout, lambda: build_criterion("teacher", cfg()), None),
    "aligned": (lambda: Stages(0, heads=2), aligned_criterion, lambda: Stages(1, features=True)),
}


def resumable_fit(method, resume_dir=None, stop_after=None, seed=3):
    make_model, make_criterion, make_teacher = METHODS[method]
    model, criterion, rows = make_model(), make_criterion(), []
    teacher = make_teacher() if make_teacher else None

    def on_epoch(row):
        rows.append(row)
        if row["epoch"] == stop_after:
            raise KeyboardInterrupt

    optim = cfg(epochs=4, optimizer="adamw", lr=0.05, weight_decay=0.01, schedule="cosine", warmup_epochs=1,
                warmup_lr=0.001, min_lr=0.0001)
    torch.manual_seed(0)
    result = fit(model, criterion, FitData(data(12), data(6, seed=1)), CPU,
                 FitSettings(optim, seed=seed, batch_size=4, resume_dir=resume_dir, fingerprint="f", grad_probes=0),
                 teacher, on_epoch=on_epoch)
    return result, model, criterion, rows


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")} for row in history]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_interrupted_fit_resumes_after_its_last_pass_and_ends_as_an_uninterrupted_one(method, tmp_path, caplog):
    whole, whole_model, whole_criterion, _ = resumable_fit(method)
    with pytest.raises(KeyboardInterrupt):
        resumable_fit(method, tmp_path, stop_after=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    with caplog.at_level(logging.INFO, logger="hdkd.training.engine"):
        resumed, model, criterion, rows = resumable_fit(method, tmp_path)
    assert f"resuming from epoch 2 of 4 ({tmp_path / 'last.pt'})" in caplog.messages
    assert resumed.resumed_from == 2 and [r["epoch"] for r in rows] == [3, 4]  # passes 1 and 2 not trained again
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert (resumed.best_epoch, resumed.best) == (whole.best_epoch, whole.best)
    assert all(torch.equal(v, whole_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, whole_criterion.state_dict()[k]) for k, v in criterion.state_dict().items())
    if method == "aligned":  # the loss's own parameters (the projectors) trained with the network
        untrained = aligned_criterion().state_dict()
        assert all(not torch.equal(v, untrained[k]) for k, v in criterion.state_dict().items() if "weight" in k)


def test_each_pass_logs_a_line_with_its_numbers_and_marks_the_best(caplog):
    with caplog.at_level(logging.INFO, logger="hdkd.training.engine"):
        result, _, _, _ = resumable_fit("alone")
    from hdkd.training.engine import is_better

    best, lines = None, []
    for r in result.history:
        improved = is_better(r, best)
        best = r if improved else best
        lines.append(f"train epoch {r['epoch']}/4  loss {r['train_loss']:.4f}  train acc {r['train_accuracy']:.3f}  "
                     f"val loss {r['val_loss']:.4f}  val acc {r['val_accuracy']:.3f}  lr {r['lr']:.2e}  "
                     f"{r['images_per_s']:.0f} img/s{'  *best' if improved else ''}")
    assert caplog.messages == lines
    assert any(line.endswith("  *best") for line in lines) and not all(line.endswith("  *best") for line in lines)


class Epochs(TensorDataset):
    """A training set that is told each pass's number (as augmentation drawing per pass is)."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.told = []

    def set_epoch(self, epoch):
        self.told.append(epoch)


def test_each_pass_draws_a_seeded_order_of_its_own_and_tells_the_data_its_number():
    from torch.utils.data import DistributedSampler

    train = Epochs(*data(12).tensors)
    order, hook_told = [], []

    class Hook:
        def __call__(self, images):
            order.append(images)
            return images

        def set_epoch(self, epoch):
            hook_told.append(epoch)

    optim = cfg(epochs=3)
    fit(Linear(), build_criterion("teacher", optim), FitData(train, data(6, seed=1), Hook()), CPU,
        FitSettings(optim, seed=5, batch_size=4))
    rows_of = {tuple(x.tolist()): i for i, x in enumerate(train.tensors[0])}
    seen = [rows_of[tuple(x.tolist())] for batch in order for x in batch]
    sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=5)
    expected = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        expected += list(sampler)
    assert seen == expected and seen[:12] != seen[12:24] and seen[:12] != list(range(12))
    assert train.told == hook_told == [0, 1, 2]


def test_the_progress_bars_count_the_passes_from_where_the_fit_resumes(monkeypatch, tmp_path):
    import hdkd.training.engine as engine

    Bar.made = []
    monkeypatch.setattr(engine, "tqdm", Bar)
    with pytest.raises(KeyboardInterrupt):
        resumable_fit("alone", tmp_path, stop_after=1)
    Bar.made = []
    result, _, _, _ = resumable_fit("alone", tmp_path)
    passes, *each = Bar.made
    assert passes.kwargs == {"desc": "train", "initial": 1, "total": 4, "disable": True, "dynamic_ncols": True}
    Bar.made = []
    optim = cfg(epochs=1)
    fit(Linear(), build_criterion("teacher", optim), FitData(data(8), data(3, seed=1)),
        engine.Runtime(torch.device("cpu")), FitSettings(optim, seed=0, batch_size=4))
    assert Bar.made[0].kwargs["disable"] is None  # a runtime that shows progress: a bar on a terminal
    assert list(passes.iterable) == [1, 2, 3]
    assert [bar.kwargs["desc"] for bar in each] == ["train 2/4", "train 3/4", "train 4/4"]
    best = [max(r["val_accuracy"] for r in result.history[:i + 1]) for i in range(4)]
    assert passes.postfix == [{"val_acc": f"{r['val_accuracy']:.3f}", "best": f"{b:.3f}"}
                              for r, b in zip(result.history[1:], best[1:], strict=True)]


def test_validation_shares_are_named_by_the_class_names_given():
    optim = cfg(epochs=1)
    result = fit(Linear(), build_criterion("teacher", optim), FitData(data(12), data(6, seed=1)), CPU,
                 FitSettings(optim, seed=0, batch_size=4, class_names=("glioma", "meningioma", "none")))
    assert sorted(k for k in result.history[0] if k.startswith("val_pred_")) == [
        "val_pred_glioma", "val_pred_meningioma", "val_pred_none"]


def test_the_smallest_training_split_is_two_samples_per_process():
    optim = cfg(epochs=1)
    fit(Linear(), build_criterion("teacher", optim), FitData(data(2), data(3, seed=1)), CPU,
        FitSettings(optim, seed=0, batch_size=4))
    from hdkd.infra.distributed import DistInfo
    from hdkd.training.engine import Runtime

    two = Runtime(torch.device("cpu"), DistInfo(rank=0, world_size=2), progress=False)
    with pytest.raises(ValueError) as e:
        fit(Linear(), build_criterion("teacher", optim), FitData(data(3), data(3, seed=1)), two,
            FitSettings(optim, seed=0, batch_size=4))
    assert str(e.value) == "the training split has 3 samples: BatchNorm needs at least 2 per process"
    with pytest.raises(ValueError) as e:
        fit(Linear(), build_criterion("teacher", optim), FitData(data(8), data(3, seed=1)), two,
            FitSettings(optim, seed=0, batch_size=5))
    assert str(e.value) == "train.batch_size (5) must be divisible by the number of processes (2)"
    with pytest.raises(ValueError) as e:
        fit(Stages(0, heads=2), aligned_criterion(), FitData(data(8), data(3, seed=1)), two,
            FitSettings(optim, seed=0, batch_size=4), Stages(1, features=True))
    assert str(e.value) == ("a loss with parameters (aligned feature distillation) trains in one process: "
                            "DistributedDataParallel would not reduce its gradients")


def test_a_fit_interrupted_after_its_best_pass_returns_that_pass_when_resumed(tmp_path):
    optim = cfg(epochs=6, lr=0.3)  # validation rises to pass 3, then falls (as in the test of the best pass above)

    def run(resume_dir=None, stop_after=None):
        model = Linear()

        def stop(row):
            if row["epoch"] == stop_after:
                raise KeyboardInterrupt

        torch.manual_seed(0)
        result = fit(model, build_criterion("teacher", optim), FitData(data(12), data(5, seed=1)), CPU,
                     FitSettings(optim, seed=0, batch_size=4, resume_dir=resume_dir, fingerprint="f"), on_epoch=stop)
        return result, model

    whole, whole_model = run()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=3)
    result, model = run(tmp_path)  # no later pass is better: the best weights come from the resume state
    assert result.best_epoch == whole.best_epoch == 3 and result.resumed_from == 3
    assert all(torch.equal(v, whole_model.state_dict()[k]) for k, v in model.state_dict().items())


def test_each_pass_draws_from_a_generator_seeded_by_the_runs_seed_its_rank_and_the_pass():
    from hdkd.data.seeding import derive_seed

    seeds = []

    class Records(Linear):
        def forward(self, x, return_features=False):
            if self.training:
                seeds.append(torch.initial_seed())
            return super().forward(x, return_features)

    optim = cfg(epochs=3)
    fit(Records(), build_criterion("teacher", optim), FitData(data(8), data(3, seed=1)), CPU,
        FitSettings(optim, seed=11, batch_size=4))
    assert seeds == [derive_seed(11, 0, epoch) for epoch in range(3) for _ in range(2)]
    assert len(set(seeds)) == 3


def test_the_running_loss_in_log_lines_is_the_total_loss_of_a_distilling_pass(caplog):
    from torch.utils.data import DataLoader

    student, teacher = Stages(0, heads=2), Stages(1, features=True)
    optim = distill_cfg()
    with caplog.at_level(logging.INFO, logger="hdkd.training.engine"):
        row = one_pass(student, build_criterion("hdkd", optim), optim, DataLoader(data(12), batch_size=4),
                       teacher=teacher, log_every=3, desc="hdkd 1/1")
    assert caplog.messages == [f"hdkd 1/1 step 3/3  loss {row['train_loss']:.4f}  lr 0.00e+00"]
    assert f"{row['train_loss']:.4f}" != f"{row['train_ce']:.4f}"


def test_a_distilling_loss_without_a_teacher_is_refused():
    from hdkd.training.engine import forward_loss

    optim = distill_cfg()
    with pytest.raises(ValueError, match=r"'soft' distillation needs the student's \(cls, dist\) logits and teacher "
                                         r"logits"):
        forward_loss(Stages(0, heads=2), build_criterion("hdkd", optim), data(4).tensors[0], data(4).tensors[1])
