"""The embedded dataset: real on-disk formats, deterministic, and classes that can be told apart."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from hdkd.data.formats import BRAIN_CLASSES, HAM_CLASSES, HAM_COLUMNS, HAM_COUNTS, HAM_METADATA, HAM_PARTS
from hdkd.data.synthetic import HAM_STYLES, apportion, generate, lesion_style, render_brain_image, render_ham_image
from hdkd.infra.io import dvc_md5
from tests.helpers.params import section


def test_ham_layout_matches_the_real_format(tmp_path):
    out = generate(section("data.synthetic", layout="ham10000", num_images=200, native_size=30), tmp_path / "ham")
    meta = pd.read_csv(out / HAM_METADATA)
    assert tuple(meta.columns) == HAM_COLUMNS
    assert len(meta) == 200 and meta["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    parts = {p: sorted(f.stem for f in (out / p).glob("ISIC_*.jpg")) for p in HAM_PARTS}
    assert len(parts[HAM_PARTS[0]]) == round(200 * 5000 / 10015) and sum(map(len, parts.values())) == 200
    assert max(parts[HAM_PARTS[0]]) < min(parts[HAM_PARTS[1]])  # part 1 holds the first ids, as the real zips
    with Image.open(out / HAM_PARTS[0] / f"{parts[HAM_PARTS[0]][0]}.jpg") as img:
        assert img.size == (40, 30) and img.mode == "RGB"  # 4:3 like the real 600x450
    per_lesion = meta.groupby("lesion_id")
    assert per_lesion.size().max() > 1 and per_lesion["dx"].nunique().max() == 1
    counts = meta["dx"].value_counts()
    assert set(counts.index) == set(HAM_CLASSES) and counts.idxmax() == "nv" and counts.min() >= 4
    assert counts["nv"] / 200 > 0.5  # the real imbalance (nv 67 %)


def test_brain_layout_matches_the_real_format(tmp_path):
    out = generate(
        section("data.synthetic", layout="brain_tumor_mri", num_images=200, native_size=32), tmp_path / "mri"
    )
    files = sorted(out.glob("*/*/*.jpg"))
    assert {f.parent.parent.name for f in files} == {"Training", "Testing"}
    assert {f.parent.name for f in files} == set(BRAIN_CLASSES)
    assert all(
        f.name.startswith(("Tr-gl_", "Tr-me_", "Tr-no_", "Tr-pi_", "Te-gl_", "Te-me_", "Te-no_", "Te-pi_"))
        for f in files
    )
    modes, sizes = Counter(), set()
    for f in files:
        with Image.open(f) as img:
            modes[img.mode] += 1
            sizes.add(img.size)
    assert set(modes) == {"L", "RGB"} and len(sizes) > 10  # mixed modes and sizes, as in the real set
    digests = {}
    for f in files:
        digests.setdefault(hashlib.md5(f.read_bytes()).hexdigest(), set()).add(f.parent.parent.name)
    assert any(splits == {"Training", "Testing"} for splits in digests.values())  # cross-split copies


def test_generation_is_deterministic_and_skipped_when_present(tmp_path):
    cfg = section("data.synthetic", num_images=60, native_size=24)
    a = generate(cfg, tmp_path / "a")
    b = generate(cfg, tmp_path / "b")
    assert dvc_md5(a) == dvc_md5(b)
    assert dvc_md5(generate(cfg.model_copy(update={"seed": 1}), tmp_path / "c")) != dvc_md5(a)
    mtime = (a / HAM_METADATA).stat().st_mtime_ns
    generate(cfg, a)
    assert (a / HAM_METADATA).stat().st_mtime_ns == mtime
    generate(cfg.model_copy(update={"num_images": 61}), a)  # other settings: regenerated in place
    assert len(pd.read_csv(a / HAM_METADATA)) == 61


def test_ambiguity_takes_a_share_of_the_signature_from_a_look_alike():
    def styles(ambiguity):
        return [lesion_style("nv", np.random.default_rng(k), ambiguity) for k in range(4000)]

    assert all(s == HAM_STYLES["nv"] for s in styles(0.0))  # no ambiguity: the class's own signature
    mixed = styles(0.6)
    others = [c for c in HAM_CLASSES if c != "nv"]
    # texture from the look-alike with probability s ~ U(0, 0.6): 30 % of lesions, spread over the others
    borrowed = Counter(s.texture for s in mixed if s.texture != "smooth")
    assert abs(sum(borrowed.values()) / len(mixed) - 0.3) < 0.03
    assert set(borrowed) == {HAM_STYLES[c].texture for c in others}
    # colour: on average a share E[s] = 0.3 of the way from nv's to the mean look-alike's
    own, alike = np.array(HAM_STYLES["nv"].colour), np.mean([HAM_STYLES[c].colour for c in others], axis=0)
    np.testing.assert_allclose(np.mean([s.colour for s in mixed], axis=0), own + 0.3 * (alike - own), atol=2.0)
    assert max(np.abs(np.array(s.colour) - own).max() for s in mixed) > 0


def test_ambiguity_zero_renders_the_unmixed_images_and_more_mixes_in_a_look_alike():
    # The digest of these renders by the code before ambiguity existed (commit 9c2c0ee^): ambiguity 0
    # must leave every image as it was, so the unmixed benchmark stays reproducible.
    plain = [render_brain_image("notumor", k, 32, 32, 0.0) for k in range(20)]
    digest = hashlib.md5()
    for image in [render_ham_image(dx, 5, 6, 24, 32, 0.0) for dx in ("nv", "mel")] + plain:
        digest.update(image.tobytes())
    assert digest.hexdigest() == "4cec710c902dc2277791654714dec7dd"
    # MRI: a slice without a tumour shows its look-alike's tumour at a share s ~ U(0, ambiguity)
    faint, strong = ([np.abs(render_brain_image("notumor", k, 32, 32, a).astype(int) - p).mean()
                      for k, p in enumerate(plain)] for a in (0.3, 0.9))
    assert min(strong) > 0 and np.mean(strong) > 2 * np.mean(faint)


def test_apportion_keeps_proportions_and_minimum():
    n = apportion(1500, HAM_COUNTS, minimum=4)
    assert sum(n.values()) == 1500 and min(n.values()) >= 4
    assert n["nv"] > n["mel"] > n["bcc"] > n["akiec"] > n["vasc"] > n["df"]


def _small_cnn_accuracy(render, classes, size: int = 32) -> float:
    """Test accuracy of a small CNN trained for ~1 s on 40 images per class (20 held out per class)."""
    torch.manual_seed(0)

    def images(offset: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = [render(c, 1000 * label + offset + j, size) for label, c in enumerate(classes) for j in range(n)]
        y = [label for label in range(len(classes)) for _ in range(n)]
        return (torch.tensor(np.stack(x)).permute(0, 3, 1, 2).float() - 128) / 64, torch.tensor(y)

    (x, y), (x_test, y_test) = images(0, 40), images(500, 20)

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    net = nn.Sequential(
        *block(3, 16),
        *block(16, 32),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(classes)),
    )
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(25):
        for batch in torch.randperm(len(x)).split(32):
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return (net(x_test).argmax(1) == y_test).float().mean().item()


def test_ham_classes_are_learnable_by_a_small_cnn():
    def render(dx, seed, size):
        return render_ham_image(dx, seed, seed + 7, size, size)

    assert _small_cnn_accuracy(render, HAM_CLASSES) > 0.7  # chance: 1/7


def test_brain_classes_are_learnable_by_a_small_cnn():
    def render(tumour, seed, size):
        return np.repeat(render_brain_image(tumour, seed, size, size)[..., None], 3, axis=2)

    assert _small_cnn_accuracy(render, BRAIN_CLASSES) > 0.5  # chance: 1/4


@pytest.mark.parametrize("damage", ["delete", "edit", "add"])
def test_a_damaged_tree_is_regenerated(tmp_path, caplog, damage):
    cfg = section("data.synthetic", num_images=60, native_size=24)
    tree = generate(cfg, tmp_path / "raw/synthetic_ham10000")
    clean = dvc_md5(tree)
    victim = sorted((tree / HAM_PARTS[1]).glob("*.jpg"))[3]
    if damage == "delete":
        victim.unlink()
    elif damage == "edit":
        victim.write_bytes(victim.read_bytes()[:-10])  # truncated
    else:
        (tree / HAM_PARTS[0] / "ISIC_9999999.jpg").write_bytes(victim.read_bytes())
    caplog.set_level(logging.INFO, logger="hdkd.data.synthetic")
    generate(cfg, tree)
    assert dvc_md5(tree) == clean
    assert "no longer match" in caplog.text and "regenerating" in caplog.text


def test_the_default_dataset_is_byte_for_byte_the_one_before_the_variety_keys(tmp_path):
    # params.yaml's data.synthetic (variety off) generates the very tree of before subtypes and nuisance existed,
    # its stamp included: the digest the download stage records (data/raw/source.json's tree_digest), unchanged
    from hdkd.config import load_params
    from hdkd.data.synthetic import Variety, stamp_settings
    from tests.helpers import ROOT

    cfg = load_params(ROOT / "params.yaml").data.synthetic
    assert (cfg.subtypes, cfg.nuisance, Variety.of(cfg)) == (1, 0.0, None)
    assert set(stamp_settings(cfg)) == {"format_version", "layout", "num_images", "native_size", "seed", "ambiguity"}
    assert dvc_md5(generate(cfg, tmp_path / "default")) == "916dfefcc35a12b4fd321559339228dd.dir"
    assert stamp_settings(cfg.model_copy(update={"subtypes": 4}))["subtypes"] == 4  # variety on: in the stamp


def test_variety_draws_zipf_looks_fixed_by_the_dataset_seed_and_leaves_the_images_alone_when_off():
    from hdkd.data.synthetic import Variety

    variety = Variety(8, 0.5, 0)
    draws = Counter(variety.subtype(np.random.default_rng(k)) for k in range(20_000))
    zipf = 1 / np.arange(1, 9)
    np.testing.assert_allclose([draws[k] / 20_000 for k in range(8)], zipf / zipf.sum(), atol=0.01)
    for render in (lambda v: render_brain_image("glioma", 3, 32, 32, 0.3, v),
                   lambda v: render_ham_image("mel", 5, 6, 24, 32, 0.3, v)):
        plain, varied = render(None), render(variety)
        assert np.array_equal(varied, render(Variety(8, 0.5, 0))) and not np.array_equal(plain, varied)
        assert not np.array_equal(varied, render(Variety(8, 0.5, 1)))  # another dataset seed: other looks
    # subtypes alone (no nuisance) change only the looks: a slice without a tumour, its anatomy
    assert not np.array_equal(render_brain_image("notumor", 3, 32, 32, 0.0, Variety(8, 0.0, 0)),
                              render_brain_image("notumor", 3, 32, 32, 0.0))


def test_a_varied_tree_is_generated_and_stamped_with_its_variety(tmp_path):
    cfg = section("data.synthetic", layout="brain_tumor_mri", num_images=60, native_size=24, subtypes=4,
                  nuisance=0.5)
    out = generate(cfg, tmp_path / "mri")
    stamp = (out / ".synthetic.json").read_text()
    assert '"subtypes": 4' in stamp and '"nuisance": 0.5' in stamp
    assert dvc_md5(generate(cfg, tmp_path / "again")) == dvc_md5(out)
    plain = generate(cfg.model_copy(update={"subtypes": 1, "nuisance": 0.0}), tmp_path / "plain")
    assert dvc_md5(plain) != dvc_md5(out)
