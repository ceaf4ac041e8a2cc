"""The methods HDKD claims to beat, as models of their own (params' kd): DeiT into a ViT, logit-only distillation,
feature distillation through learned alignment layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hdkd.infra.distributed import DistInfo
from hdkd.models import FrozenTeacher, create_model
from hdkd.models.checkpoint import load_model, save_model
from hdkd.roster import roster_entry
from hdkd.training.engine import FitData, FitSettings, Runtime, fit
from hdkd.training.losses import (
    AlignedFeatureDistillationLoss,
    FeatureDistillationLoss,
    HDKDLoss,
    LogitDistillationLoss,
)
from hdkd.training.run import StagePaths, build_criterion, recipe, run_training
from tests.helpers.fit import CPU, toy_split
from tests.helpers.params import make_params

DEIT = {"method": "deit", "timm": "deit_tiny_distilled_patch16_224",
        "kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "distill": {"type": "hard", "alpha": 0.5, "lambda": 0, "epochs": 1}}
LOGIT = {"method": "logit", "timm": None, "kwargs": {}, "distill": {"lambda": 0, "epochs": 1}}
ALIGNED = {"method": "aligned", "timm": None, "kwargs": {}, "distill": {"epochs": 1}}


def kd_params(**kd):
    return make_params({"kd": kd, "fractions": [1.0], "baseline_fractions": [1.0], "tracking": {"enabled": False},
                        "data": {"image_size": 32}})


def identity_projectors(loss: AlignedFeatureDistillationLoss) -> None:
    with torch.no_grad():
        for conv in loss.projectors.values():
            conv.weight.copy_(torch.eye(conv.in_channels).reshape(conv.out_channels, conv.in_channels, 1, 1))
            conv.bias.zero_()


def test_the_projector_variants_loss_equals_the_direct_mse_when_the_projector_is_the_identity():
    torch.manual_seed(0)
    channels = (4, 6, 8)
    student = [torch.randn(2, c, 8 // 2**i, 8 // 2**i) for i, c in enumerate(channels)]
    teacher = [torch.randn_like(f) for f in student]
    aligned = AlignedFeatureDistillationLoss(channels, stages=(1, 2, 3), beta=1.0)
    direct = FeatureDistillationLoss((1, 2, 3), beta=1.0)
    assert not torch.allclose(aligned(student, teacher), direct(student, teacher))  # learned: not the identity
    identity_projectors(aligned)
    assert torch.allclose(aligned(student, teacher), direct(student, teacher))
    # by hand: sum of (i+1) * mean squared difference
    hand = sum((i + 1) * ((s - t) ** 2).mean() for i, (s, t) in enumerate(zip(student, teacher)))
    assert torch.allclose(aligned(student, teacher), hand)
    # the total HDKD loss too, with the same logits
    z = (torch.randn(2, 3), torch.randn(2, 3))
    y, t_logits = torch.tensor([0, 2]), torch.randn(2, 3)
    logit = LogitDistillationLoss("soft", 0.5, 1.0)
    assert torch.allclose(HDKDLoss(logit, aligned, 10.0)(z, y, t_logits, student, teacher).total,
                          HDKDLoss(logit, direct, 10.0)(z, y, t_logits, student, teacher).total)
    # a stage left out has no projector, and its map is not touched
    assert set(AlignedFeatureDistillationLoss(channels, stages=(2, 3)).projectors) == {"2", "3"}


def test_the_deit_distilled_vit_has_two_heads_and_deits_loss_on_a_hand_made_case():
    torch.manual_seed(0)
    model = create_model("timm:deit_tiny_distilled_patch16_224", 3, 32, **DEIT["kwargs"])
    x = torch.randn(2, 3, 32, 32)
    model.train()
    cls, dist = model(x)  # training: the class head's and the distillation head's logits
    assert cls.shape == dist.shape == (2, 3) and not torch.allclose(cls, dist)
    (logits, feats) = model(x, return_features=True)
    assert isinstance(logits, tuple) and feats == []
    model.eval()  # no dropout, no BatchNorm: eval answers the average of the same two heads (DeiT's inference)
    with torch.no_grad():
        assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)
    # DeiT's loss: 0.5 CE(class head, y) + 0.5 CE(distillation head, argmax teacher), on chosen numbers
    z_cls, z_dist = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    y, teacher = torch.tensor([0]), torch.tensor([[0.1, 0.2, 3.0]])  # the teacher says class 2
    ce_cls = math.log(math.exp(2) + 2) - 2  # -log softmax(z_cls)[0]
    ce_dist = math.log(math.e + 2)  # -log softmax(z_dist)[2] = log(e + 2) - 0
    params = kd_params(deit=DEIT)
    criterion = build_criterion(roster_entry("deit", params), recipe(params, roster_entry("deit", params)))
    parts = criterion((z_cls, z_dist), y, teacher)
    assert parts.total.item() == pytest.approx(0.5 * ce_cls + 0.5 * ce_dist)
    assert not criterion.needs_features


def test_logit_only_is_the_hdkd_recipe_without_the_feature_loss():
    params = kd_params(logit_kd=LOGIT)
    entry = roster_entry("logit_kd", params)
    cfg = recipe(params, entry)
    assert cfg.lambda_ == 0 and cfg.model_dump(exclude={"lambda_", "epochs"}) == params.distill.model_dump(
        exclude={"lambda_", "epochs"})
    criterion = build_criterion(entry, cfg)
    assert not criterion.needs_features and criterion.logit.kind == params.distill.type


def _teacher(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    save_model(path, create_model("teacher_tiny", 3, image_size=32), "teacher_tiny", ["a", "b", "c"], 32, {})
    return path


def _train(tmp_path, name, params):
    paths = StagePaths(tmp_path / "train", tmp_path / "val", tmp_path / name, tmp_path / f"{name}.json",
                       tmp_path / "resume" / name, _teacher(tmp_path))
    data = (toy_split(32), toy_split(16, seed=1), ["a", "b", "c"])
    rt = Runtime(torch.device("cpu"), DistInfo(), progress=False)
    run_training(name, params, paths, data, rt, register=False)
    return load_model(tmp_path / name / "model.pt")


def test_the_aligned_method_trains_its_projectors_and_saves_the_plain_hdkd_network(tmp_path):
    model, meta = _train(tmp_path, "aligned_kd", kd_params(aligned_kd=ALIGNED))
    assert meta["model_name"] == "hdkd_tiny" and not any("projector" in k for k in model.state_dict())
    reference = create_model("hdkd_tiny", 3, image_size=32)
    assert model.state_dict().keys() == reference.state_dict().keys()
    # the projectors are in the optimizer: one step moves them
    student = create_model("hdkd_tiny", 3, image_size=32)
    criterion = build_criterion(roster_entry("aligned_kd", kd_params(aligned_kd=ALIGNED)),
                                kd_params(aligned_kd=ALIGNED).kd["aligned_kd"].distill,
                                tuple(s[0] for s in student.feature_shapes))
    before = [p.detach().clone() for p in criterion.parameters()]
    teacher = load_model(tmp_path / "teacher.pt")[0]
    cfg = kd_params(aligned_kd=ALIGNED).kd["aligned_kd"].distill
    fit(student, criterion, FitData(toy_split(16), toy_split(16, seed=1)), CPU, FitSettings(cfg, seed=0, batch_size=16),
        teacher=FrozenTeacher(teacher))
    assert all(not torch.equal(a, b) for a, b in zip(before, criterion.parameters()))


def test_an_interrupted_aligned_fit_resumes_with_its_projectors_and_ends_identically(tmp_path):
    params = kd_params(aligned_kd={**ALIGNED, "distill": {"epochs": 3}})
    cfg = params.kd["aligned_kd"].distill
    teacher_path = _teacher(tmp_path)
    def run(resume_dir, stop_after=None):
        torch.manual_seed(0)
        student = create_model("hdkd_tiny", 3, image_size=32)
        criterion = build_criterion(roster_entry("aligned_kd", params), cfg, tuple(s[0] for s in student.feature_shapes))

        def stop(row):
            if row["epoch"] == stop_after:
                raise KeyboardInterrupt

        settings = FitSettings(cfg, seed=0, batch_size=16, resume_dir=resume_dir, fingerprint="f")
        return fit(student, criterion, FitData(toy_split(32), toy_split(16, seed=1)), CPU, settings,
                   FrozenTeacher(load_model(teacher_path)[0]), on_epoch=stop)

    straight = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_after=1)
    resumed = run(tmp_path)
    timing = ("epoch_time_s", "images_per_s")
    assert resumed.resumed_from == 1
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in straight.history]


def test_the_deit_method_distils_the_teacher_into_a_vit_and_evaluates_on_the_average_of_its_heads(tmp_path):
    model, meta = _train(tmp_path, "deit_vit", kd_params(deit_vit=DEIT))
    assert meta["model_name"] == "timm:deit_tiny_distilled_patch16_224" and meta["overrides"] == DEIT["kwargs"]
    model.eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    assert isinstance(model.net.head_dist, nn.Linear)


def test_a_loss_with_parameters_is_refused_under_several_processes():
    student = create_model("hdkd_tiny", 3, image_size=32)
    cfg = kd_params(aligned_kd=ALIGNED).kd["aligned_kd"].distill
    criterion = AlignedFeatureDistillationLoss(tuple(s[0] for s in student.feature_shapes))
    rt = Runtime(torch.device("cpu"), DistInfo(rank=0, world_size=2), progress=False)
    with pytest.raises(ValueError, match="one process"):
        fit(student, HDKDLoss(LogitDistillationLoss("none"), criterion, 1.0), FitData(toy_split(8), toy_split(8)),
            rt, FitSettings(cfg, seed=0, batch_size=2))


def test_kd_methods_are_checked_by_the_schema():
    with pytest.raises(ValueError, match="lambda must be 0 for method logit"):
        kd_params(x={**LOGIT, "distill": {"lambda": 1.0}})
    with pytest.raises(ValueError, match="lambda must be > 0 for method aligned"):
        kd_params(x={**ALIGNED, "distill": {"lambda": 0}})
    with pytest.raises(ValueError, match="timm: a timm architecture for method deit"):
        kd_params(x={**DEIT, "timm": None})
    with pytest.raises(ValueError, match="not a valid name"):
        kd_params(hdkd=LOGIT)
    from hdkd.config import ConfigError
    from hdkd.models.baselines import check_baselines

    with pytest.raises(ConfigError, match="kd.x.timm: deit_tiny_patch16_224 has no distillation token"):
        check_baselines(kd_params(x={**DEIT, "timm": "deit_tiny_patch16_224"}))
    check_baselines(kd_params(x=DEIT))
    params = kd_params(x=LOGIT)  # inherits the distill section's values, its own replacing them
    assert params.kd["x"].distill.lambda_ == 0 and params.kd["x"].distill.alpha == params.distill.alpha
