"""Loading packed splits: normalisation, SPEC augmentation, determinism across workers and batches."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from hdkd.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    apply_batch_params,
    augment_batch,
    augment_image,
    eval_transform,
    normalize,
    sample_params,
    train_transform,
)
from hdkd.data.errors import DataError
from hdkd.data.loader import PackedDataset
from hdkd.data.packed import IMAGES, INDEX, LABELS, MANIFEST, load_split
from hdkd.data.seeding import derive_seed
from hdkd.infra.io import write_json
from tests.helpers.params import section


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A packed directory with a 20-image train split of smooth random 32 px images."""
    root = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    noise = torch.tensor(rng.integers(0, 256, (20, 3, 32, 32)), dtype=torch.float32)
    images = torch.nn.functional.avg_pool2d(noise, 5, 1, 2).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    (root / "train").mkdir()
    np.save(root / "train" / IMAGES, images)
    np.save(root / "train" / LABELS, np.arange(20) % 3)
    pd.DataFrame({"image_id": [f"img{i}" for i in range(20)]}).to_csv(root / "train" / INDEX, index=False)
    write_json(root / MANIFEST, {"classes": ["a", "b", "c"]})
    return root


def test_load_split_memory_maps_and_checks(packed):
    split = load_split(packed, "train", image_size=32)
    assert isinstance(split.images, np.memmap) and split.classes == ("a", "b", "c")
    assert split.class_counts() == {"a": 7, "b": 7, "c": 6} and split.ids[3] == "img3"
    assert len(pickle.dumps(split)) < 1000  # a reference, not the pixels
    assert (pickle.loads(pickle.dumps(split)).images == split.images).all()
    with pytest.raises(DataError, match="32px images but data.image_size is 64"):
        load_split(packed, "train", image_size=64)
    with pytest.raises(DataError, match="missing.*dvc repro"):
        load_split(packed, "val")


def test_eval_items_are_normalised_chw_float_and_int64_labels(packed):
    split = load_split(packed, "train")
    image, label = PackedDataset(split, eval_transform())[4]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert label.dtype == torch.int64 and int(label) == 1
    expected = (
        torch.tensor(split.images[4]).permute(2, 0, 1) / 255.0 - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(image, expected, atol=1e-6)
    raw, _ = PackedDataset(split)[4]  # no transform: the uint8 tensor, for augment_batch
    assert raw.dtype == torch.uint8 and (raw.permute(1, 2, 0).numpy() == split.images[4]).all()


def test_augmentation_depends_on_seed_epoch_and_index_only(packed):
    split = load_split(packed, "train")
    ds = PackedDataset(split, train_transform(section("augment")), seed=5)
    first = ds[7][0]
    torch.manual_seed(123)  # the global RNG state does not matter ...
    assert torch.equal(ds[7][0], first)
    state = torch.get_rng_state()
    ds[3]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    assert not torch.equal(PackedDataset(split, train_transform(section("augment")), seed=6)[7][0], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[7][0], first)
    ds.set_epoch(0)
    assert torch.equal(ds[7][0], first)


def _epoch(ds, epoch, **loader_kwargs) -> torch.Tensor:
    ds.set_epoch(epoch)
    return torch.cat([x for x, _ in DataLoader(ds, shuffle=False, **loader_kwargs)])


def test_augmented_batches_do_not_depend_on_workers_or_batch_size(packed):
    ds = PackedDataset(load_split(packed, "train"), train_transform(section("augment")), seed=1)
    reference = _epoch(ds, 2, batch_size=4, num_workers=0)
    assert torch.equal(_epoch(ds, 2, batch_size=7, num_workers=2), reference)
    assert torch.equal(_epoch(ds, 2, batch_size=3, num_workers=2, persistent_workers=True), reference)
    assert not torch.equal(_epoch(ds, 3, batch_size=4, num_workers=2), reference)


def test_persistent_workers_see_set_epoch(packed):
    ds = PackedDataset(load_split(packed, "train"), train_transform(section("augment")), seed=1)
    loader = DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(epochs[1], _epoch(ds, 1, batch_size=5, num_workers=0))


def test_disabled_augmentation_is_plain_normalisation(packed):
    split = load_split(packed, "train")
    a = PackedDataset(split, train_transform(section("augment", enabled=False)))[2][0]
    assert torch.equal(a, PackedDataset(split, eval_transform())[2][0])


def test_parameters_follow_torchvision_distributions():
    p = sample_params(20_000, section("augment"), torch.Generator().manual_seed(0))
    assert -180 <= p["angle"].min() < -179 and 179 < p["angle"].max() <= 180
    assert 0.7 <= p["brightness"].min() < 0.71 and 1.29 < p["contrast"].max() <= 1.3
    assert 0.1 <= p["sigma"].min() < 0.11 and 1.99 < p["sigma"].max() <= 2.0
    for coin in ("hflip", "vflip", "brightness_first", "sharpen"):
        assert abs(p[coin].float().mean() - 0.5) < 0.02


def test_augment_image_is_torchvision_v2_with_the_drawn_parameters():
    x = _batch(1)[0]
    cfg = section("augment")
    p = {k: v.item() for k, v in sample_params(1, cfg, torch.Generator().manual_seed(9)).items()}
    y = TF.rotate(x, p["angle"])
    y = TF.horizontal_flip(y) if p["hflip"] else y
    y = TF.vertical_flip(y) if p["vflip"] else y
    if p["brightness_first"]:
        y = TF.adjust_contrast(TF.adjust_brightness(y, p["brightness"]), p["contrast"])
    else:
        y = TF.adjust_brightness(TF.adjust_contrast(y, p["contrast"]), p["brightness"])
    y = TF.adjust_sharpness(y, 2.0) if p["sharpen"] else y
    y = TF.gaussian_blur(y, [3, 3], [p["sigma"]] * 2)
    assert torch.equal(augment_image(x, cfg, torch.Generator().manual_seed(9)), y)


def test_switched_off_steps_are_skipped():
    x = _batch(1)[0]
    flips = section("augment", rotation=0, brightness=0, contrast=0, sharpness=0, blur_kernel=0, vflip=False)
    seen = set()
    for seed in range(12):
        out = augment_image(x, flips, torch.Generator().manual_seed(seed))
        assert torch.equal(out, x) or torch.equal(out, x.flip(-1))
        seen.add(torch.equal(out, x))
    assert seen == {True, False}
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        train_transform(section("augment"))(x)


# ------------------------------------------------------------------------------ batched form
def _batch(n=6, size=28) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (n, 3, size, size + 6), generator=g).float()
    return torch.nn.functional.avg_pool2d(noise, 5, 1, 2).to(torch.uint8)


def test_augment_batch_equals_augment_image_per_image():
    cfg = section("augment")
    x = _batch(8)
    per_image = [sample_params(1, cfg, torch.Generator().manual_seed(i)) for i in range(8)]
    params = {k: torch.cat([p[k] for p in per_image]) for k in per_image[0]}
    out = apply_batch_params(x, params, cfg)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i in range(8):
        diff = (out[i].int() - augment_image(x[i], cfg, torch.Generator().manual_seed(i)).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float rounding only


def test_augment_batch_is_deterministic_per_generator_and_varies_per_image():
    cfg = section("augment")
    x = _batch(8)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment_batch(x, cfg, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, augment_batch(x, cfg, torch.Generator().manual_seed(4)))
    same = augment_batch(x[:1].expand(8, -1, -1, -1).contiguous(), cfg, torch.Generator().manual_seed(3))
    assert len({tuple(img.flatten().tolist()) for img in same}) == 8  # own parameters per image
    assert torch.equal(augment_batch(x, section("augment", enabled=False), torch.Generator()), x)


def test_batch_augment_draws_depend_only_on_seed_rank_and_epoch():
    cfg = section("augment")
    x = _batch(4)

    def draw(seed=0, rank=0, epoch=0, skip=0):
        hook = BatchAugment(cfg, seed, rank)
        for _ in range(skip):  # batches drawn before: a resumed run has not drawn them
            hook(x)
        hook.set_epoch(epoch)
        return hook(x)

    first = draw(epoch=2)
    assert first.dtype == torch.float32 and first.shape == x.shape  # normalised
    assert torch.equal(first, draw(epoch=2, skip=3))
    assert torch.equal(first, normalize(augment_batch(x, cfg, torch.Generator().manual_seed(derive_seed(0, 0, 2)))))
    assert not torch.equal(first, draw(epoch=3))
    assert not torch.equal(first, draw(epoch=2, rank=1))
    assert not torch.equal(first, draw(epoch=2, seed=1))


def test_augment_batch_flips_only():
    cfg = section("augment", rotation=0, brightness=0, contrast=0, sharpness=0, blur_kernel=0)
    x = _batch(16)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    kinds = set()
    for i in range(16):
        for name, candidate in {
            "id": x[i],
            "h": x[i].flip(-1),
            "v": x[i].flip(-2),
            "hv": x[i].flip(-1, -2),
        }.items():
            if torch.equal(out[i], candidate):
                kinds.add(name)
                break
        else:
            raise AssertionError(f"image {i} is not a flip of its input")
    assert len(kinds) >= 3


def test_normalize_works_on_batches():
    x = _batch(2)
    assert torch.allclose(normalize(x)[1], normalize(x[1]))
