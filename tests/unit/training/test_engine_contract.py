"""The training loop's contract (hdkd.training.engine), on a linear classifier: what each pass's row reports is
what was trained, the optimizer steps and images each pass takes, the learning rate a row names, what gradient
clipping bounds, which weights a fit returns, and the errors of data it cannot train on.
(tests/unit/training/test_run.py and test_properties.py hold the schedule, resume and budget across networks.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hdkd.training.engine import FitData, FitSettings, build_optimizer, fit, lr_at, probe_steps
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


def test_a_step_budget_takes_exactly_its_steps_the_last_pass_cut_short():
    result, rows, seen = run_fit(Linear(), data(12), data(6, seed=1), cfg(epochs=1), batch_size=4, total_steps=8)
    assert len(seen) == 8 and [r["epoch"] for r in rows] == [1, 2, 3]  # 3 + 3 + 2 steps
    assert len(result.history) == 3


def test_each_row_names_the_learning_rate_its_pass_began_with():
    optim = cfg(epochs=4, optimizer="adamw", lr=0.01, schedule="cosine", warmup_epochs=1, warmup_lr=0.001,
                min_lr=0.0001)
    _, rows, _ = run_fit(Linear(), data(12), data(6, seed=1), optim, batch_size=4)
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(optim, e) for e in range(4)], rel=1e-9)
    _, rows, _ = run_fit(Linear(), data(12), data(6, seed=1), optim, batch_size=4, total_steps=24)
    # under a budget of 24 steps the 4 epochs of the schedule span 24 steps, 6 passes of 3
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(optim, 4 * 3 * e / 24) for e in range(8)], rel=1e-9)


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


@pytest.mark.parametrize(("steps", "probes", "expected"), [(10, 2, {1, 6}), (9, 3, {1, 4, 7}), (1, 2, {1}),
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
