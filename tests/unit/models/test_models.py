import pytest
import torch

from hdkd.config import ConfigError
from hdkd.geometry import PATCH_SIZE, image_size_step
from hdkd.models import FrozenTeacher, HybridStudent, StageSpec, TransformerSpec, create_model, list_models, model_name
from tests.helpers.params import make_params

PAPER_PARAMS = {  # SPEC §2: the official implementation's counts
    ("teacher", 7): 3_948_677, ("student", 7): 3_724_977, ("hdkd", 7): 3_727_288,
    ("teacher", 4): 3_948_290, ("student", 4): 3_724_206, ("hdkd", 4): 3_725_746,
}


@pytest.mark.parametrize("name,classes", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name, classes):
    model = create_model(name, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[(name, classes)]


@pytest.mark.parametrize("name", ["teacher", "student", "hdkd"])
def test_paper_feature_shapes(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, 224, 224), return_features=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 112, 112), (96, 56, 56), (192, 28, 28)]
    assert logits.shape == (1, 7)


@pytest.mark.parametrize("size", ["tiny", "paper"])
def test_registry_families_share_stage_shapes(size):
    shapes = {role: create_model(model_name(role, size), 3, image_size=64).feature_shapes
              for role in ("teacher", "student", "hdkd")}
    assert shapes["teacher"] == shapes["student"] == shapes["hdkd"]


def test_features_come_from_the_same_pass():
    model = create_model("hdkd_tiny", 3, image_size=32).eval()
    calls = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: calls.append(m))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        plain = model(x)
    assert len(calls) == 2 * len(model.stages)  # one run per stage per call
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(feats, model.forward_features(x))


def test_hdkd_trains_with_two_heads_and_infers_with_their_average():
    model = create_model("hdkd_tiny", 5, image_size=32)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        tokens = model.transformer(model.forward_features(x)[-1])
        cls, dist = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
        avg = model(x)
    torch.testing.assert_close(avg, (cls + dist) / 2)
    assert not torch.allclose(cls, dist)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (3, 5)


def test_plain_student_returns_a_single_head():
    model = create_model("student_tiny", 5, image_size=32).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    assert model.transformer.pos_embed.shape[1] == (32 // 8 // 2) ** 2 + 1


def test_mbconv_ablation_swaps_cbam_for_squeeze_excitation():
    mbcsa = create_model("hdkd", 7, block="mbcsa")
    mbconv = create_model("hdkd", 7, block="mbconv")
    names = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert "CBAM" in names(mbcsa) and "SqueezeExcite" not in names(mbcsa)
    assert "SqueezeExcite" in names(mbconv) and "CBAM" not in names(mbconv)
    with torch.no_grad():
        assert mbconv.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 7)


def test_stem_stride_four_quarters_the_maps_and_keeps_shapes_equal():
    teacher = create_model("teacher", 7, stem_stride=4)
    student = create_model("hdkd", 7, stem_stride=4).eval()
    assert teacher.feature_shapes == student.feature_shapes == [(64, 56, 56), (96, 28, 28), (192, 14, 14)]
    with torch.no_grad():
        _, feats = student(torch.randn(1, 3, 224, 224), return_features=True)
    assert [tuple(f.shape[1:]) for f in feats] == student.feature_shapes
    assert student.transformer.pos_embed.shape[1] == 7 * 7 + 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=60), "multiple of 8"),
    (dict(stem_stride=3), "stem_stride"),
    (dict(block="resnet"), "block"),
    (dict(depths=(1, 1)), "3 stage depths"),
])
def test_bad_sizes_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("hdkd_tiny", 3, **{"image_size": 64, **kwargs})


def test_unknown_model_lists_known_ones():
    with pytest.raises(KeyError, match="hdkd_tiny"):
        create_model("deit", 3)
    assert {"teacher", "student", "hdkd", "teacher_tiny", "student_tiny", "hdkd_tiny"} <= set(list_models())


def test_every_size_is_a_constructor_argument():
    model = HybridStudent(2, 48, StageSpec(depths=(1, 2, 1), widths=(8, 16, 24)),
                          TransformerSpec(dim=32, depth=1, heads=4, dim_head=8, patch_size=3), dropout=0.1)
    assert len(model.stages[1]) == 2 and len(model.transformer.layers) == 1
    assert model.transformer.patch_embed.proj.in_features == 24 * 9
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 2)


def test_frozen_teacher_stays_in_eval_mode_without_grads():
    teacher = FrozenTeacher(create_model("teacher_tiny", 3, image_size=32))
    teacher.train()
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    logits, feats = teacher(torch.randn(2, 3, 32, 32))
    assert not logits.requires_grad and len(feats) == 3


@pytest.mark.parametrize("stem_stride", [2, 4])
def test_params_accept_exactly_the_image_sizes_every_network_takes(stem_stride):
    step = image_size_step(stem_stride, PATCH_SIZE)
    for size in (step, 2 * step):  # accepted by params, built by every network
        make_params({"data": {"image_size": size}, "model": {"stem_stride": stem_stride}})
        for name in ("teacher_tiny", "student_tiny", "hdkd_tiny"):
            create_model(name, 3, image_size=size, stem_stride=stem_stride)
    odd = step + step // 2
    with pytest.raises(ConfigError, match="data.image_size"):  # refused by params ...
        make_params({"data": {"image_size": odd}, "model": {"stem_stride": stem_stride}})
    with pytest.raises(ValueError, match="not divisible by the patch size"):  # ... and by the student
        create_model("student_tiny", 3, image_size=odd, stem_stride=stem_stride)


def test_patches_become_tokens_row_by_row_each_ordered_p1_p2_c():
    # The official einops pattern b c (h p1) (w p2) -> b (h w) (p1 p2 c), without the reference fixture: with the
    # norms and projection made identities, token k is patch (k // w, k % w), read (row, column, channel).
    from hdkd.models.transformer import PatchEmbed

    c, p, side = 2, 2, 4
    embed = PatchEmbed(c, c * p * p, p)
    embed.norm_in, embed.norm_out = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        embed.proj.weight.copy_(torch.eye(c * p * p))
        embed.proj.bias.zero_()
    x = torch.arange(c * side * side, dtype=torch.float32).reshape(1, c, side, side)
    tokens = embed(x)[0]
    assert tokens.shape == (4, 8)
    for k in range(4):
        row, col = divmod(k, side // p)
        patch = x[0, :, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (c, p1, p2)
        assert torch.equal(tokens[k], patch.permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("distillation", [True, False])
def test_the_class_token_comes_first_then_the_distillation_token_then_the_patches(distillation):
    from hdkd.models.transformer import DFLT

    dflt = DFLT(8, 4, TransformerSpec(dim=16, depth=0, heads=2, dim_head=8, patch_size=2), distillation)
    dflt.norm = torch.nn.Identity()  # no layers, no norm: the tokens as they enter the transformer
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        out, patches = dflt(x), dflt.patch_embed(x)
    prefix = [dflt.cls_token] + ([dflt.dist_token] if distillation else [])
    assert out.shape == (3, len(prefix) + 4, 16)
    for i, token in enumerate(prefix):
        assert torch.allclose(out[:, i], (token[:, 0] + dflt.pos_embed[:, i]).expand(3, -1))
    assert torch.allclose(out[:, len(prefix):], patches + dflt.pos_embed[:, len(prefix):])
    # and the heads read them so: the class head token 0, the distillation head token 1
    model = HybridStudent(3, 32, StageSpec(depths=(1, 1, 1), widths=(8, 8, 8)),
                          TransformerSpec(dim=16, depth=1, heads=2, dim_head=8), distillation=True).train()
    tokens = torch.randn(2, 6, 16)

    class Fixed(torch.nn.Module):
        def forward(self, _):
            return tokens

    model.transformer = Fixed()
    cls, dist = model.forward_head(torch.zeros(2, 8, 4, 4))
    assert torch.allclose(cls, model.head(tokens[:, 0])) and torch.allclose(dist, model.head_dist(tokens[:, 1]))
