"""The models, losses and checkpoint translation reproduce the official implementation.

Everything about the fixture is read from ``meta.json``: the tests hold for any fixture of its form.
"""

import pytest
import torch
from torch import nn

from hdkd.models import FrozenTeacher, HybridStudent, InvertedResidual, StageSpec, TeacherCNN, TransformerSpec
from hdkd.models.compat import (
    CheckpointMismatchError,
    load_official_checkpoint,
    load_official_state_dict,
    save_official_checkpoint,
    to_official,
)
from hdkd.training.engine import forward_loss
from hdkd.training.losses import FeatureDistillationLoss, HDKDLoss, LogitDistillationLoss


def construct(reference, role):
    """A freshly initialised network of the fixture's configuration (``teacher``, ``student`` or ``hdkd``)."""
    meta = reference["meta"]
    common = dict(num_classes=meta["num_classes"], image_size=meta["image_size"])
    if role == "teacher":
        cfg = meta["teacher_config"]
        return TeacherCNN(stages=StageSpec(depths=cfg["num_blocks"], widths=cfg["channels"]), **common)
    cfg = meta["student_config"]
    patch = cfg["patch_size"]
    patch = patch[0] if isinstance(patch, list) else patch
    transformer = TransformerSpec(dim=cfg["channels"][3], depth=cfg["num_blocks"][3], heads=cfg["heads"],
                                  dim_head=cfg["dim_head"], patch_size=patch)
    return HybridStudent(stages=StageSpec(depths=cfg["num_blocks"][:3], widths=cfg["channels"][:3]),
                         transformer=transformer, distillation=role == "hdkd", **common)


def build(reference, role):
    """The fixture's network with the official weights."""
    return load_official_state_dict(construct(reference, role), reference["weights"][role])


@pytest.mark.parametrize("role,key", [("teacher", "teacher_logits"), ("student", "student_logits"),
                                      ("hdkd", "hdkd_avg_logits")])
def test_eval_logits_match_official(reference, role, key):
    model = build(reference, role).eval()
    with torch.no_grad():
        out = model(reference["io"]["x"])
    torch.testing.assert_close(out, reference["io"][key], rtol=0, atol=1e-5)


def test_hdkd_heads_match_official(reference):
    model = build(reference, "hdkd").eval()
    with torch.no_grad():
        tokens = model.transformer(model.forward_features(reference["io"]["x"])[-1])
        cls, dist = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
    torch.testing.assert_close(cls, reference["io"]["hdkd_cls_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(dist, reference["io"]["hdkd_dist_logits"], rtol=0, atol=1e-5)


def test_stage_feature_shapes_match_official(reference):
    x = reference["io"]["x"]
    expected = [tuple(s) for s in reference["meta"]["stage_feature_shapes"]]
    for role in ("teacher", "hdkd"):
        with torch.no_grad():
            _, feats = build(reference, role).eval()(x, return_features=True)
        assert [tuple(f.shape) for f in feats] == expected


def test_mbconv_pair_matches_official(reference):
    blocks = reference["meta"]["mbconv_pair"]["blocks"]
    pair = nn.Sequential(*(InvertedResidual(inp, oup, downsample=down, attention="se", kernel_size=k)
                           for inp, oup, k, down in blocks))
    load_official_state_dict(pair, reference["weights"]["mbconv_pair"]).eval()
    with torch.no_grad():
        out = pair(reference["io"]["mbconv_in"])
    torch.testing.assert_close(out, reference["io"]["mbconv_out"], rtol=0, atol=1e-5)


def test_losses_match_official(reference):
    """Every loss setting the fixture lists: total, logit part and feature part (student in train mode)."""
    x, y = reference["io"]["x"], reference["io"]["y"]
    teacher = FrozenTeacher(build(reference, "teacher"))
    mismatches = []
    for name, official in reference["meta"]["losses"].items():
        student = build(reference, "hdkd").train()
        criterion = HDKDLoss(
            LogitDistillationLoss(official["distillation_type"], official["alpha"], official["tau"]),
            FeatureDistillationLoss(beta=official["feature_layer_exponent"]),
            official["lambda"],
        )
        parts, _ = forward_loss(student, criterion, x, y, teacher)
        for ours, key in ((parts.total, "total"), (parts.logit, "logit_part"), (parts.feature, "feature_part")):
            if ours.item() != pytest.approx(official[key], rel=1e-5):
                mismatches.append(f"{name}.{key}: ours {ours.item():.8g} vs official {official[key]:.8g}")
    assert reference["meta"]["losses"], "the fixture lists no loss settings"
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("role", ["teacher", "student", "hdkd"])
def test_official_checkpoint_round_trip(reference, role, tmp_path):
    model = build(reference, role)
    official = reference["weights"][role]
    assert set(to_official(model)) == set(official)
    for k, v in to_official(model).items():
        assert torch.equal(v, official[k]), k
    path = tmp_path / f"{role}.pth"
    save_official_checkpoint(model, path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(official)
    fresh = load_official_checkpoint(construct(reference, role), path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_mismatched_checkpoint_lists_differences(reference):
    official = dict(reference["weights"]["hdkd"])
    del official["head_distill.bias"]
    official["extra.weight"] = torch.zeros(1)
    official["head_cls.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError) as e:
        load_official_state_dict(construct(reference, "hdkd"), official)
    msg = str(e.value)
    assert "missing keys (1): head_distill.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "head_cls.weight: checkpoint (3, 3) vs model" in msg


def test_student_checkpoint_does_not_fit_hdkd(reference):
    with pytest.raises(CheckpointMismatchError, match="missing keys.*distill_token"):
        load_official_state_dict(construct(reference, "hdkd"), reference["weights"]["student"])


def test_untrusted_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"stage1.0.0.weight": Evil()}, path)
    with pytest.raises(ValueError, match=r"unsafe content refused: .*evil\.pth .*\(print\)"):
        load_official_checkpoint(TeacherCNN(7, 64, StageSpec(depths=(1, 1, 1), widths=(8, 8, 8))), path)
