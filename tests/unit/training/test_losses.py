import math

import pytest
import torch
import torch.nn.functional as F

from hdkd.models import FrozenTeacher, create_model
from hdkd.training.engine import forward_loss
from hdkd.training.losses import FeatureDistillationLoss, HDKDLoss, LogitDistillationLoss


def test_soft_kd_matches_the_written_formula():
    z_cls, z_dist, t = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    alpha, tau = 0.3, 2.0
    loss, ce, kd = LogitDistillationLoss("soft", alpha, tau)((z_cls, z_dist), y, t)
    p_t = torch.softmax(t / tau, 1)
    d = (p_t * (torch.log(p_t) - torch.log_softmax(z_dist / tau, 1))).sum()
    expected_kd = tau**2 * d / z_dist.numel()
    torch.testing.assert_close(kd, expected_kd)
    torch.testing.assert_close(loss, (1 - alpha) * F.cross_entropy(z_cls, y) + alpha * expected_kd)
    _, _, kd_batch = LogitDistillationLoss("soft", alpha, tau, reduction="batch")((z_cls, z_dist), y, t)
    torch.testing.assert_close(kd_batch, tau**2 * d / 4)


def test_hard_kd_uses_the_teacher_argmax_as_label():
    z_cls, z_dist = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([[0.0, 5, 0, 0], [9, 0, 0, 0], [0, 0, 0, 1]])
    y = torch.tensor([3, 3, 3])
    loss, _, kd = LogitDistillationLoss("hard", 0.5)((z_cls, z_dist), y, t)
    torch.testing.assert_close(kd, F.cross_entropy(z_dist, torch.tensor([1, 0, 3])))
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(z_cls, y) + 0.5 * kd)


def test_none_is_plain_cross_entropy_on_the_class_head():
    z_cls, z_dist, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    loss, ce, kd = LogitDistillationLoss("none", 0.9)((z_cls, z_dist), y)
    torch.testing.assert_close(loss, F.cross_entropy(z_cls, y))
    assert kd.item() == 0


def test_distillation_without_dist_head_is_an_error():
    with pytest.raises(ValueError, match="needs the student's"):
        LogitDistillationLoss("soft")(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3))


@pytest.mark.parametrize("kwargs", [dict(kind="medium"), dict(alpha=1.5), dict(tau=0.0), dict(reduction="mean")])
def test_invalid_logit_settings_fail(kwargs):
    with pytest.raises(ValueError):
        LogitDistillationLoss(**kwargs)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_feature_loss_weights_positions_by_power_beta(beta):
    s = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 2, 2)]
    t = [torch.randn_like(f) for f in s]
    loss = FeatureDistillationLoss((1, 2, 3), beta=beta)(s, t)
    expected = sum((i + 1) ** beta * ((a - b) ** 2).mean() for i, (a, b) in enumerate(zip(s, t)))
    torch.testing.assert_close(loss, expected)
    # A subset is weighted by position in the list, as the official code does: stage 3 alone gets 1.
    torch.testing.assert_close(FeatureDistillationLoss((3,), beta=beta)(s, t), ((s[2] - t[2]) ** 2).mean())


def test_feature_shape_mismatch_names_stages_and_shapes():
    s = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    t = [torch.randn(2, 3, 8, 8), torch.randn(2, 6, 4, 4)]
    with pytest.raises(ValueError, match=r"student stage 2 is \(2, 4, 4, 4\), teacher stage 2 is \(2, 6, 4, 4\)"):
        FeatureDistillationLoss((1, 2))(s, t)


def test_feature_loss_needs_a_stage():
    with pytest.raises(ValueError, match="at least one stage"):
        FeatureDistillationLoss(())


def test_total_is_logit_plus_lambda_feature():
    torch.manual_seed(1)
    teacher = FrozenTeacher(create_model("teacher_tiny", 3, image_size=32))
    student = create_model("hdkd_tiny", 3, image_size=32).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    parts, _ = forward_loss(student, HDKDLoss(LogitDistillationLoss("soft"), FeatureDistillationLoss(), 7.0), x, y, teacher)
    torch.testing.assert_close(parts.total, parts.logit + 7.0 * parts.feature)
    assert parts.feature.item() > 0 and parts.logit_kd.item() > 0


@pytest.mark.parametrize("stages", [(1, 2, 3), (2, 3)])
def test_weighted_terms_sum_to_the_total_and_name_each_stage(stages):
    torch.manual_seed(2)
    teacher = FrozenTeacher(create_model("teacher_tiny", 3, image_size=32))
    student = create_model("hdkd_tiny", 3, image_size=32).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = HDKDLoss(LogitDistillationLoss("soft", alpha=0.3), FeatureDistillationLoss(stages), 7.0)
    parts, _ = forward_loss(student, loss, x, y, teacher)
    assert list(parts.terms) == ["ce", "kd", *(f"feature_stage{s}" for s in stages)]
    torch.testing.assert_close(sum(parts.terms.values()), parts.total)
    torch.testing.assert_close(parts.terms["ce"], 0.7 * parts.ce)
    torch.testing.assert_close(parts.terms["kd"], 0.3 * parts.logit_kd)
    _, teacher_feats = teacher(x)
    _, student_feats = student(x, return_features=True)
    for i, s in enumerate(stages):  # λ · (i+1)^β · MSE, β = 1, i the stage's position in the list
        expected = 7.0 * (i + 1) * F.mse_loss(student_feats[s - 1], teacher_feats[s - 1])
        torch.testing.assert_close(parts.terms[f"feature_stage{s}"], expected)


def test_no_feature_term_at_lambda_0():
    # λ = 0 (the logit-only ablation): no feature term is computed, reported, or needs the stage maps
    student = create_model("hdkd_tiny", 3, image_size=32).train()
    loss = HDKDLoss(LogitDistillationLoss("soft"), FeatureDistillationLoss(), 0.0)
    assert not loss.needs_features
    assert HDKDLoss(LogitDistillationLoss("soft"), FeatureDistillationLoss(), 1.0).needs_features
    outputs = student(torch.randn(4, 3, 32, 32))
    parts = loss(outputs, torch.tensor([0, 1, 2, 0]), torch.randn(4, 3))  # no feature maps given
    assert list(parts.terms) == ["ce", "kd"]
    torch.testing.assert_close(parts.total, parts.logit)


def test_a_model_trained_alone_has_one_term():
    student = create_model("student_tiny", 3, image_size=32).train()
    parts, _ = forward_loss(student, HDKDLoss(LogitDistillationLoss("none"), None, 0.0), torch.randn(4, 3, 32, 32),
                            torch.tensor([0, 1, 2, 0]))
    assert list(parts.terms) == ["ce"] and parts.terms["ce"] is parts.logit
    torch.testing.assert_close(parts.terms["ce"], parts.total)


def test_one_pass_per_network_and_gradients_reach_only_the_student():
    teacher_net = create_model("teacher_tiny", 3, image_size=32)
    teacher = FrozenTeacher(teacher_net)
    student = create_model("hdkd_tiny", 3, image_size=32).train()
    runs = {"teacher": 0, "student": 0}
    for name, net in (("teacher", teacher_net), ("student", student)):
        for stage in net.stages:
            stage.register_forward_hook(lambda *_, n=name: runs.__setitem__(n, runs[n] + 1))
    bn_before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    parts, _ = forward_loss(student, HDKDLoss(LogitDistillationLoss("soft"), FeatureDistillationLoss(), 10.0),
                         torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), teacher)
    parts.total.backward()
    assert runs == {"teacher": 3, "student": 3}  # each stage once: no prefix re-computation
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(p.grad is not None and math.isfinite(p.grad.abs().sum().item())
               for p in student.parameters() if p.requires_grad)
    for k, v in teacher_net.state_dict().items():
        assert torch.equal(v, bn_before[k]), f"teacher {k} changed"
