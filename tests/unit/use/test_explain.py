"""Grad-CAM and attention rollout maps, their sanity check, `hdkd explain` and the explain stage."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from hdkd.data.packed import IMAGES, INDEX, LABELS, MANIFEST
from hdkd.infra.io import read_json, write_json
from hdkd.models import create_model
from hdkd.models.checkpoint import save_model
from hdkd.use.cli import main as cli_main
from hdkd.use.explain import attention_rollout, grad_cam, random_init, rank_correlations, rollout_matrix, unit_range
from pipeline.explain import main as stage_main
from tests.helpers.params import params_dict

SIDE = 32
CLASSES = ["red", "blue"]


@pytest.fixture
def hdkd_model():
    torch.manual_seed(0)
    return create_model("hdkd_tiny", len(CLASSES), SIDE).eval()


def test_maps_have_the_image_size_and_lie_in_unit_range(hdkd_model):
    torch.manual_seed(1)
    images = torch.randn(3, 3, SIDE, SIDE)
    teacher = create_model("teacher_tiny", len(CLASSES), SIDE).eval()
    maps = [grad_cam(teacher, images, signed=True), grad_cam(hdkd_model, images),
            grad_cam(hdkd_model, images, torch.tensor([0, 1, 0])),
            attention_rollout(hdkd_model, images, "cls"), attention_rollout(hdkd_model, images, "dist")]
    for m in maps:
        assert m.shape == (3, SIDE, SIDE)
        assert m.min() >= 0 and m.max() <= 1
        assert torch.allclose(m.flatten(1).amax(1), torch.ones(3))  # none constant here: each spans [0, 1]
    assert not torch.allclose(maps[3], maps[4])  # the two tokens attend differently
    assert hdkd_model.training is False  # eval mode kept
    hdkd_model.train()
    grad_cam(hdkd_model, images), attention_rollout(hdkd_model, images, "cls")
    assert hdkd_model.training is True  # and training mode too: the maps restore what they found
    hdkd_model.eval()


def test_unit_range_scales_each_map_and_zeroes_constant_ones():
    maps = torch.stack([torch.arange(4.0).reshape(2, 2) * 3 - 1, torch.full((2, 2), 5.0)])
    assert torch.allclose(unit_range(maps), torch.tensor([[[0, 1 / 3], [2 / 3, 1]], [[0, 0], [0, 0]]]))


def test_attention_weights_are_what_the_layer_applies(hdkd_model):
    attn = hdkd_model.transformer.layers[0].attn
    x = torch.randn(2, 5, attn.norm.normalized_shape[0])
    weights = attn.attention_weights(x)
    _, _, v = attn.heads_qkv(x)
    by_hand = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, -1))
    assert torch.allclose(attn(x), by_hand, atol=1e-5)


def test_rollout_is_row_stochastic_and_follows_abnar_zuidema():
    torch.manual_seed(0)
    layers = [torch.softmax(torch.randn(2, 3, 6, 6), -1) for _ in range(3)]
    rollout = rollout_matrix(layers)
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 6))
    assert (rollout >= 0).all()
    steps = [0.5 * a.mean(1) + 0.5 * torch.eye(6) for a in layers]  # rows already sum to 1
    assert torch.allclose(rollout, steps[2] @ steps[1] @ steps[0], atol=1e-6)
    with pytest.raises(ValueError, match="at least one layer"):
        rollout_matrix([])


def test_rollout_from_the_distillation_token_needs_one():
    student = create_model("student_tiny", len(CLASSES), SIDE).eval()
    with pytest.raises(ValueError, match="distillation token"):
        attention_rollout(student, torch.zeros(1, 3, SIDE, SIDE), "dist")
    with pytest.raises(TypeError, match="hybrid student"):
        attention_rollout(create_model("teacher_tiny", 2, SIDE), torch.zeros(1, 3, SIDE, SIDE))


def test_rank_correlations():
    a = torch.arange(8.0).reshape(2, 2, 2)
    b = torch.stack([a[0], -a[1]])
    assert rank_correlations(a, b) == pytest.approx([1.0, -1.0])
    assert rank_correlations(a, torch.zeros_like(a)) == [None, None]  # undefined for a constant map


def test_maps_follow_the_weights_not_only_the_image():
    # The sanity check's premise: two networks with other weights look elsewhere. A map computed
    # from the image alone (edges, intensity) would correlate near 1 here.
    torch.manual_seed(0)
    images = torch.randn(8, 3, SIDE, SIDE)
    labels = torch.zeros(8, dtype=torch.int64)
    nets = {name: [random_init({"model_name": name, "classes": CLASSES, "image_size": SIDE, "overrides": {}}, seed)
                   for seed in (0, 1)] for name in ("teacher_tiny", "hdkd_tiny")}
    for name, (a, b) in nets.items():
        assert rank_correlations(grad_cam(a, images, labels, signed=True),
                                 grad_cam(a, images, labels, signed=True)) == pytest.approx([1.0] * 8)
        other = rank_correlations(grad_cam(a, images, labels, signed=True), grad_cam(b, images, labels, signed=True))
        assert np.mean(other) < 0.5, (name, other)
    for token in ("cls", "dist"):
        other = rank_correlations(*(attention_rollout(m, images, token) for m in nets["hdkd_tiny"]))
        assert np.mean(other) < 0.5, (token, other)


def test_random_init_is_seeded_and_leaves_the_global_generator_alone():
    meta = {"model_name": "hdkd_tiny", "classes": CLASSES, "image_size": SIDE, "overrides": {"dropout": 0.0}}
    state = torch.random.get_rng_state()
    a, b, c = random_init(meta, 0), random_init(meta, 0), random_init(meta, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)


def test_cli_writes_one_overlay_per_input(tmp_path, hdkd_model, capsys):
    save_model(tmp_path / "model.pt", hdkd_model, "hdkd_tiny", CLASSES, SIDE, {})
    rng = np.random.default_rng(0)
    inputs = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(inputs[0])
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(inputs[1])
    for method in ("gradcam", "rollout"):
        assert cli_main(["explain", "--model", str(tmp_path / "model.pt"), "--method", method,
                         "--out", str(tmp_path / "out"), *map(str, inputs)]) == 0
        written = [tmp_path / "out" / f"{p.stem}_{method}.png" for p in inputs]
        assert sorted((tmp_path / "out").glob(f"*_{method}.png")) == sorted(written)
        for path in written:
            with Image.open(path) as png:
                assert png.format == "PNG" and png.width > 200
    save_model(tmp_path / "teacher.pt", create_model("teacher_tiny", 2, SIDE), "teacher_tiny", CLASSES, SIDE, {})
    assert cli_main(["explain", "--model", str(tmp_path / "teacher.pt"), "--method", "rollout", str(inputs[0])]) == 1
    assert "without a transformer" in capsys.readouterr().err
    kwargs = {"channels": [8, 16, 32, 64], "stem_width": 8}
    save_model(tmp_path / "resnet.pt", create_model("timm:resnet18", 2, SIDE, **kwargs), "timm:resnet18", CLASSES,
               SIDE, kwargs)
    assert cli_main(["explain", "--model", str(tmp_path / "resnet.pt"), str(inputs[0])]) == 1
    assert "baselines lack" in capsys.readouterr().err
    assert cli_main(["explain", "--model", str(tmp_path / "model.pt"), str(tmp_path / "absent.png")]) == 1
    assert "no image file" in capsys.readouterr().err


def test_stage_writes_the_figure_and_the_sanity_check_deterministically(tmp_path, hdkd_model):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10, SIDE, SIDE, 3), dtype=np.uint8)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1])
    torch.manual_seed(5)
    teacher = create_model("teacher_tiny", len(CLASSES), SIDE)
    test = tmp_path / "prepared" / "test"
    test.mkdir(parents=True)
    np.save(test / IMAGES, pixels)
    np.save(test / LABELS, labels.numpy())
    pd.DataFrame({"image_id": [f"img{i}" for i in range(10)]}).to_csv(test / INDEX, index=False)
    write_json(tmp_path / "prepared" / MANIFEST, {"classes": CLASSES})
    save_model(tmp_path / "teacher.pt", teacher, "teacher_tiny", CLASSES, SIDE, {})
    save_model(tmp_path / "hdkd.pt", hdkd_model, "hdkd_tiny", CLASSES, SIDE, {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict({"seed": 3, "data": {"image_size": SIDE}})))
    argv = ["--params", str(tmp_path / "params.yaml"), "--teacher", str(tmp_path / "teacher.pt"),
            "--hdkd", str(tmp_path / "hdkd.pt"), "--data", str(tmp_path / "prepared"), "--per-class", "2"]
    first = stage_main([*argv, "--out", str(tmp_path / "a")])
    stage_main([*argv, "--out", str(tmp_path / "b")])
    for name in ("explanations.png", "explain.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    result = read_json(tmp_path / "a" / "explain.json")
    assert result == first and result["random_init_seed"] == 3
    expected = [i for c in (0, 1) for i in np.flatnonzero(labels.numpy() == c)[:2]]
    assert [r["image_id"] for r in result["images"]] == [f"img{i}" for i in expected]
    sanity = result["sanity_trained_vs_random"]
    assert set(sanity) == {"teacher_gradcam", "hdkd_gradcam", "hdkd_rollout_cls", "hdkd_rollout_dist"}
    assert all(len(s["per_image"]) == 4 for s in sanity.values())
    assert sanity["teacher_gradcam"]["mean_spearman"] < 0.5  # other weights (seed 3, not 5): other maps
    assert -1 <= result["agreement_teacher_vs_hdkd_gradcam"]["mean_spearman"] <= 1
    with Image.open(tmp_path / "a" / "explanations.png") as png:
        assert png.format == "PNG" and "Software" not in png.info  # no version stamp: byte-identical rebuilds

    save_model(tmp_path / "other.pt", hdkd_model, "hdkd_tiny", ["x", "y"], SIDE, {})
    with pytest.raises(ValueError, match="other.pt was trained on classes"):
        stage_main([*argv[:4], "--hdkd", str(tmp_path / "other.pt"), *argv[6:], "--out", str(tmp_path / "c")])


def test_explain_given_an_onnx_export_says_it_needs_the_pytorch_model_file(tmp_path, capsys):
    from hdkd.infra.torch_io import save_torch

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.9.0:\x8a\x01\n\x05graph")  # an ONNX ModelProto's first fields
    assert cli_main(["explain", "--model", str(onnx), str(image)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hdkd explain: error: {onnx} is an ONNX export: ") and "models/<role>/model.pt" in err, err
    assert "torch.load" not in err and "weights_only" not in err and err.count("\n") == 1, err
    save_torch(tmp_path / "unknown.pt", {"format": "hdkd-model/1", "model_name": "resnet9000", "classes": CLASSES,
                                         "image_size": SIDE, "overrides": {}, "state_dict": {}})
    assert cli_main(["explain", "--model", str(tmp_path / "unknown.pt"), str(image)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hdkd explain: error: {tmp_path / 'unknown.pt'} names the network 'resnet9000'"), err


def _stage_inputs(tmp_path, hdkd_model):
    """The explain stage's inputs: a packed test split of 10 random images, a teacher and the HDKD student."""
    rng = np.random.default_rng(0)
    test = tmp_path / "prepared" / "test"
    test.mkdir(parents=True)
    np.save(test / IMAGES, rng.integers(0, 256, (10, SIDE, SIDE, 3), dtype=np.uint8))
    np.save(test / LABELS, np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1]))
    pd.DataFrame({"image_id": [f"img{i}" for i in range(10)]}).to_csv(test / INDEX, index=False)
    write_json(tmp_path / "prepared" / MANIFEST, {"classes": CLASSES})
    torch.manual_seed(5)
    save_model(tmp_path / "teacher.pt", create_model("teacher_tiny", len(CLASSES), SIDE), "teacher_tiny", CLASSES,
               SIDE, {})
    save_model(tmp_path / "hdkd.pt", hdkd_model, "hdkd_tiny", CLASSES, SIDE, {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict({"seed": 3, "data": {"image_size": SIDE}})))
    return ["--params", str(tmp_path / "params.yaml"), "--teacher", str(tmp_path / "teacher.pt"),
            "--hdkd", str(tmp_path / "hdkd.pt"), "--data", str(tmp_path / "prepared"), "--per-class", "3"]


def test_a_map_that_is_the_same_on_every_image_is_not_drawn_as_an_explanation(tmp_path, hdkd_model, monkeypatch):
    import hdkd.use.explain as explain_module

    real_rollout = explain_module.attention_rollout

    def corner(model, images, token="cls"):  # what the HDKD rollout did: one corner lit, whatever the image
        maps = real_rollout(model, images, token)
        if token == "cls":
            y, x = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
            lit = torch.exp(-torch.hypot(y.float(), x.float()) / 8)  # bright in the top-left corner, fading
            maps = unit_range(lit + 0.01 * torch.rand(maps.shape))  # and a faint trace of each image
        return maps

    monkeypatch.setattr(explain_module, "attention_rollout", corner)
    figures = []
    real_png = explain_module.figure_png
    monkeypatch.setattr(explain_module, "figure_png", lambda fig, *a: (figures.append(fig), real_png(fig, *a))[1])
    stage_main([*_stage_inputs(tmp_path, hdkd_model), "--out", str(tmp_path / "out")])
    result = read_json(tmp_path / "out" / "explain.json")
    assert {"sanity_trained_vs_random", "agreement_teacher_vs_hdkd_gradcam", "images"} <= result.keys()  # kept
    dependence = result["input_dependence"]
    assert set(dependence) == {"teacher_gradcam", "hdkd_gradcam", "hdkd_rollout_cls", "hdkd_rollout_dist"}
    assert dependence["hdkd_rollout_cls"]["mean_spearman"] > 0.9 and dependence["hdkd_rollout_cls"]["pairs"] == 15
    shown = {k: v["shown"] for k, v in result["checks"].items()}
    assert shown["hdkd_rollout_cls"] is False and shown["teacher_gradcam"] is True
    assert "same map on every image" in " ".join(result["checks"]["hdkd_rollout_cls"]["withheld_because"])
    (fig,) = figures  # the figure itself: no map over the images of a withheld column, and it says so
    axes = np.asarray(fig.axes[:-1]).reshape(6, 5)  # the last axes: the colour bar
    titles = [ax.get_title() for ax in axes[0]]
    withheld = next(j for j, t in enumerate(titles) if "class token" in t)
    assert "withheld" in titles[withheld].lower()
    for row in axes:
        assert len(row[withheld].get_images()) == 1  # the test image alone
        assert any("withheld" in t.get_text().lower() for t in row[withheld].texts)
        assert len(row[1].get_images()) == 2  # the teacher's Grad-CAM, drawn over its image


def test_the_command_line_marks_an_overlay_that_explains_nothing(tmp_path, hdkd_model, monkeypatch, capsys):
    import hdkd.use.explain as explain_module

    def corner(model, images, token="cls"):  # one corner lit whatever the image and the weights
        y, x = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
        return unit_range(torch.exp(-torch.hypot(y.float(), x.float()) / 8).expand(len(images), SIDE, SIDE).clone())

    save_model(tmp_path / "model.pt", hdkd_model, "hdkd_tiny", CLASSES, SIDE, {})
    rng = np.random.default_rng(0)
    inputs = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in inputs:
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path)
    argv = ["explain", "--model", str(tmp_path / "model.pt"), "--method", "rollout", "--out", str(tmp_path / "out"),
            *map(str, inputs)]
    assert cli_main(argv) == 0
    honest = (tmp_path / "out" / "a_rollout.png").read_bytes()
    monkeypatch.setattr(explain_module, "attention_rollout", corner)
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "are not drawn as explanations: fails the randomisation check" in err and "same map on every image" in err
    assert (tmp_path / "out" / "a_rollout.png").read_bytes() != honest
