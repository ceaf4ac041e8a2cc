"""Properties of training a user would notice, written from the contracts: the validation loss is the mean over
the images, the learning rate follows the schedule's formula at every step, validation comes once per epoch of the
schedule, and a run done for other params is pending again."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hdkd.training.engine import build_optimizer, build_scheduler, validate, validation_rounds
from hdkd.training.run import PendingRun, StagePaths, input_fingerprint
from tests.helpers.fit import CPU
from tests.helpers.params import make_params, section


def test_the_validation_loss_and_accuracy_are_means_over_the_images_not_the_batches():
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4 and 2: uneven on purpose
    row = validate(model, loader, CPU, ("a", "b", "c"))
    with torch.no_grad():
        logits = model(x)
    per_image = [nn.functional.cross_entropy(logits[i:i + 1], y[i:i + 1]).item() for i in range(10)]
    assert row["val_loss"] == pytest.approx(sum(per_image) / 10, rel=1e-6)
    assert row["val_accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    shares = [row[f"val_pred_{c}"] for c in "abc"]
    assert sum(shares) == pytest.approx(1.0)
    assert shares == pytest.approx([(logits.argmax(1) == k).float().mean().item() for k in range(3)])


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_the_learning_rate_at_every_step_is_the_schedules_formula(warmup_epochs):
    cfg = section("student", epochs=5, optimizer="adamw", lr=1e-3, schedule="cosine", warmup_epochs=warmup_epochs,
                  warmup_lr=1e-5, min_lr=1e-5)
    steps_per_epoch, total = 3, 15
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    warmup = warmup_epochs * steps_per_epoch
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    def formula(step: int) -> float:  # linear warmup from warmup_lr, then cosine from lr down to min_lr
        if step < warmup:
            return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
        t = (step - warmup) / (total - warmup)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))

    assert seen == pytest.approx([formula(s) for s in range(total)], rel=1e-6)


def test_a_finished_run_is_pending_again_when_a_param_that_shapes_its_result_changes(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    paths = StagePaths(tmp_path / "train", tmp_path / "val", tmp_path / "out", tmp_path / "m.json", tmp_path / "r")
    params = make_params()

    def pending(p) -> PendingRun:
        return PendingRun((0, 1.0), input_fingerprint("teacher", p, paths, (0, 1.0)), tmp_path / "done.json")

    pending(params).mark_done()
    assert pending(params).is_done()
    changed = make_params({"teacher": {"lr": params.teacher.lr * 2}})
    assert not pending(changed).is_done()  # a stale model would otherwise ship
    quieter = make_params({"train": {"log_every": params.train.log_every + 5}})
    assert pending(quieter).is_done()  # how often it logs never changes a result
    (tmp_path / "train" / "x.npy").write_bytes(b"other inputs")
    assert not pending(params).is_done()  # nor do other input files keep it done


def test_validation_follows_each_pass_that_reaches_an_epoch_boundary_of_the_schedule_and_no_other():
    # Every step budget, pass length and epoch count of a small grid; the schedule's epoch k ends at step
    # k * total / epochs (exact fractions), and a pass spans the steps (start, end].
    for total, per_pass, epochs in itertools.product(range(1, 41), range(1, 13), range(1, 9)):
        rounds = validation_rounds(total, per_pass, epochs)
        passes = [(p * per_pass, min((p + 1) * per_pass, total)) for p in range(math.ceil(total / per_pass))]
        assert [p for r in rounds for p in r] == list(range(len(passes)))  # every pass once, in order
        boundaries = [Fraction(k * total, epochs) for k in range(1, epochs + 1)]
        validated_after = {r[-1] for r in rounds}
        for p, (start, end) in enumerate(passes):
            assert (p in validated_after) == any(start < b <= end for b in boundaries), (total, per_pass, epochs, p)
