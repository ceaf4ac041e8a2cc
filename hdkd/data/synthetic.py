"""The embedded default dataset, generated deterministically in the on-disk format of a real one.

- ``layout: ham10000`` writes ``HAM10000_metadata.csv`` (the real columns) and ``ISIC_*.jpg``
  files (4:3, like the real 600×450) split over the two part folders as the real zips are, with
  several images per lesion and the real class imbalance.
- ``layout: brain_tumor_mri`` writes ``Training/<class>/Tr-xx_0000.jpg`` and ``Testing/...``
  with the real split and class proportions, grayscale and RGB JPEGs of varying sizes, and a few
  cross-split duplicates, as the real set has.

Each class has its own visual signature (shape, colour, texture, location) under nuisance
variation (rotation, position, scale, brightness, noise, hairs), so that a small CNN learns it
clearly above chance, but not from one pixel. Images of one lesion share their appearance.
Every image is drawn from its own seed, so the output depends only on ``data.synthetic``.

``ambiguity`` (``data.synthetic.ambiguity``, in [0, 1]) makes a share of the cases genuinely
ambiguous, as in real dermoscopy, where a nevus can look like a melanoma: per lesion (per slice in
the MRI layout) a look-alike class is drawn uniformly among the others, and a share
``s ~ U(0, ambiguity)`` of the signature (colour, size, outline irregularity; placement in MRI) is
taken from it, with probability ``s`` its texture (MRI: tumour appearance) too. Cases with a large
share look more like the other class than their own, so no model can reach 100 %: the benchmark
does not saturate and differences between models remain measurable. ``0`` gives the unmixed
signatures (the same images as before the knob existed).

**Variety** (``data.synthetic.subtypes`` and ``nuisance``) makes the amount of training data matter, as in real
medical images, where a class holds many looks and a small sample shows only the common ones:

- ``subtypes`` K: each class has K looks, fixed by the dataset's seed (MRI: the tumour's intensity, necrotic
  core, speckle, size, elongation and outline, and for "notumor" the brain's anatomy: ventricles, gyri; HAM:
  the lesion's colour, size, outline and texture, the texture half the time another class's). Each image (each
  lesion) shows look k with probability proportional to 1/(k+1) (Zipf): a small share of the data sees the rare
  looks a few times or never, all of it sees each. The class's own rule stays: where the tumour sits and how
  large (MRI), the lesion's signature most of the time (HAM).
- ``nuisance`` n in [0, 1]: per-image variation that carries no class information: MRI: the head's position
  (up to ±0.2n), scale (1 − 0.25n to 1 + 0.2n), any rotation (up to ±πn), ventricle size, contrast (gamma),
  a smooth bias field, a textured background and more noise; HAM: the lesion's position and scale, skin tone,
  an illumination gradient, vignetting, hairs and noise.

Variety draws from streams of its own: K = 1 and n = 0 give the images as before these keys existed, and
leave the generated tree's stamp as it was (a tree generated then stays valid).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from hdkd.config import NO_VARIETY, SyntheticConfig
from hdkd.data.formats import (
    BRAIN_CLASSES,
    BRAIN_COUNTS,
    BRAIN_FILE_PREFIX,
    HAM_CLASSES,
    HAM_COLUMNS,
    HAM_COUNTS,
    HAM_METADATA,
    HAM_PART_1_SHARE,
    HAM_PARTS,
)
from hdkd.data.seeding import derive_seed
from hdkd.infra.io import atomic_dir, dvc_md5, read_json, write_json

log = logging.getLogger(__name__)

STAMP = ".synthetic.json"  # the settings a generated tree was made with
JPEG_QUALITY = 90


def generate(cfg: SyntheticConfig, dest: Path) -> Path:
    """Write the synthetic tree for ``cfg`` at ``dest`` (atomically), unless it is already there, intact.

    The stamp records the settings and a digest of the files generated: a tree whose files no
    longer match it (one deleted, edited or added) is generated again, not trusted.
    """
    settings = stamp_settings(cfg)
    problem = _check_tree(dest, settings)
    if problem is None:
        log.info("%s: synthetic %s data already generated, files intact", dest, cfg.layout)
        return dest
    log.info("%s: %s; %s %d synthetic %s images", dest, problem,
             "regenerating" if dest.exists() else "generating", cfg.num_images, cfg.layout)
    with atomic_dir(dest) as tmp:
        (_write_ham_tree if cfg.layout == "ham10000" else _write_brain_tree)(cfg, tmp)
        write_json(tmp / STAMP, {**settings, "digest": _digest(tmp)})
    return dest


def stamp_settings(cfg: SyntheticConfig) -> dict[str, object]:
    """What a tree's stamp records: the settings, less variety keys at their neutral values (the images are those
    of before the keys existed, so a tree generated then keeps its stamp, its digest and its validity)."""
    settings = {"format_version": 1, **cfg.model_dump()}
    return {k: v for k, v in settings.items() if not (k in NO_VARIETY and v == NO_VARIETY[k])}


@dataclass(frozen=True)
class Variety:
    """Within-class variety (module doc): ``subtypes`` looks per class, fixed by the dataset's ``seed``, and the
    ``nuisance`` strength."""

    subtypes: int
    nuisance: float
    seed: int

    @staticmethod
    def of(cfg: SyntheticConfig) -> Variety | None:
        """The variety of ``cfg``; ``None`` when there is none (the images as before the keys existed)."""
        if cfg.subtypes == NO_VARIETY["subtypes"] and cfg.nuisance == NO_VARIETY["nuisance"]:
            return None
        return Variety(cfg.subtypes, cfg.nuisance, cfg.seed)

    def subtype(self, rng: np.random.Generator) -> int:
        """A look, the k-th with probability proportional to 1 / (k + 1) (Zipf)."""
        weights = 1.0 / np.arange(1, self.subtypes + 1)
        return int(rng.choice(self.subtypes, p=weights / weights.sum()))


def _check_tree(dest: Path, settings: dict[str, object]) -> str | None:
    """Why the tree at ``dest`` is not what ``settings`` generate, or None if it is."""
    if not dest.is_dir():
        return "not generated yet"
    try:
        stamp = read_json(dest / STAMP)
    except (OSError, ValueError):
        return f"no readable {STAMP}"
    if {k: v for k, v in stamp.items() if k != "digest"} != settings:
        return "generated with other data.synthetic settings"
    if stamp.get("digest") != _digest(dest):
        return "its files no longer match those generated (one deleted, edited or added)"
    return None


def _digest(tree: Path) -> str:
    """DVC-style hash of every file of a generated tree but the stamp."""
    return dvc_md5(tree, [p for p in tree.rglob("*") if p.is_file() and p.name != STAMP])


def apportion(total: int, weights: dict[str, float], minimum: int) -> dict[str, int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder), at least ``minimum`` each."""
    keys = list(weights)
    w = np.array([weights[k] for k in keys], dtype=np.float64)
    free = total - minimum * len(keys)
    if free < 0:
        raise ValueError(f"{total} items cannot give {minimum} to each of {len(keys)} parts")
    raw = w / w.sum() * free
    n = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - n), kind="stable")[: free - n.sum()]:
        n[i] += 1
    return {k: minimum + int(v) for k, v in zip(keys, n)}


# ---------------------------------------------------------------------------- HAM10000 layout
@dataclass(frozen=True)
class _Style:
    colour: tuple[int, int, int]
    radius: tuple[float, float]  # of the lesion, in half the image's short side
    irregular: float  # amplitude of the boundary's harmonics
    texture: str


HAM_STYLES = {
    "akiec": _Style((196, 96, 86), (0.35, 0.55), 0.16, "scaly"),
    "bcc": _Style((222, 160, 160), (0.30, 0.45), 0.07, "vessels"),
    "bkl": _Style((165, 122, 82), (0.35, 0.55), 0.10, "ridges"),
    "df": _Style((158, 106, 76), (0.20, 0.30), 0.04, "scar"),
    "mel": _Style((70, 45, 35), (0.40, 0.60), 0.24, "blotches"),
    "nv": _Style((128, 82, 56), (0.28, 0.42), 0.04, "smooth"),
    "vasc": _Style((150, 28, 58), (0.25, 0.40), 0.05, "lacunae"),
}
_LESION_SIZES = (1, 2, 3, 4, 5)  # images per lesion: ~1.35 on average, as 10,015 / 7,470
_LESION_SIZE_P = (0.77, 0.14, 0.05, 0.03, 0.01)
_DX_TYPE = {
    "akiec": "histo",
    "bcc": "histo",
    "bkl": "histo",
    "df": "consensus",
    "mel": "histo",
    "nv": "follow_up",
    "vasc": "consensus",
}
_SITES = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "foot",
    "scalp",
    "neck",
)
_ORIGINS = ("vidir_modern", "rosendahl", "vidir_molemax", "vienna_dias")


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of half the short side, origin at the image centre."""
    half = min(height, width) / 2
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return (x + 0.5 - width / 2) / half, (y + 0.5 - height / 2) / half


def _waves(rng: np.random.Generator, n: int, freq: tuple[float, float]):
    """A random smooth field f(x, y) in about [-1, 1]: a sum of plane waves (rotates with its coordinates)."""
    f = rng.uniform(*freq, n)
    theta = rng.uniform(0, 2 * np.pi, n)
    phase = rng.uniform(0, 2 * np.pi, n)

    def field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x)
        for fi, ti, pi in zip(f, theta, phase):
            out += np.sin(2 * np.pi * fi * (x * np.cos(ti) + y * np.sin(ti)) + pi)
        return out / np.sqrt(n / 2)

    return field


def _wobble(rng: np.random.Generator, phi: np.ndarray, irregular: float) -> np.ndarray:
    """A random closed outline: 1 + a few harmonics of the polar angle."""
    k = np.arange(2, 7)
    amps = rng.uniform(0, irregular, len(k)) / np.sqrt(k - 1)
    phases = rng.uniform(0, 2 * np.pi, len(k))
    return 1 + sum(a * np.cos(ki * phi + p) for a, ki, p in zip(amps, k, phases))


def lesion_style(dx: str, rng: np.random.Generator, ambiguity: float) -> _Style:
    """The signature one lesion of class ``dx`` shows: its class's, partly a look-alike's.

    A look-alike class is drawn uniformly among the others and a share ``s ~ U(0, ambiguity)``
    of colour, size range and outline irregularity is taken from it; with probability ``s`` its
    texture too. Lesions with a large share look more like the other class than their own.
    """
    own = HAM_STYLES[dx]
    other = HAM_STYLES[rng.choice([c for c in HAM_CLASSES if c != dx])]
    share = rng.uniform(0, ambiguity)
    texture = other.texture if rng.random() < share else own.texture

    def mix(a, b):
        return tuple((1 - share) * np.asarray(a, dtype=np.float64) + share * np.asarray(b, dtype=np.float64))

    return _Style(mix(own.colour, other.colour), mix(own.radius, other.radius),
                  float(mix([own.irregular], [other.irregular])[0]), texture)


@lru_cache(maxsize=4096)
def _ham_subtype(dx: str, k: int, seed: int) -> tuple[tuple[float, float, float], float, float, str | None]:
    """Look ``k`` of class ``dx`` (variety): a colour shift, a size factor, added outline irregularity, and a
    texture (another class's half the time; ``None``: the lesion's own)."""
    rng = np.random.default_rng([seed, 11, HAM_CLASSES.index(dx), k])
    shift = tuple(float(c) for c in rng.normal(0, 30, 3))
    borrowed = str(rng.choice([HAM_STYLES[c].texture for c in HAM_CLASSES])) if rng.random() < 0.5 else None
    return shift, float(rng.uniform(0.75, 1.3)), float(rng.uniform(0, 0.12)), borrowed


def subtype_style(style: _Style, dx: str, k: int, seed: int) -> _Style:
    """``style`` (a lesion of class ``dx``) as look ``k`` of its class shows it (:class:`Variety`)."""
    shift, size, irregular, texture = _ham_subtype(dx, k, seed)
    colour = tuple(float(np.clip(c + d, 20, 250)) for c, d in zip(style.colour, shift))
    return _Style(colour, tuple(r * size for r in style.radius), style.irregular + irregular, texture or style.texture)


def render_ham_image(dx: str, lesion_seed: int, image_seed: int, height: int, width: int,
                     ambiguity: float = 0.0, variety: Variety | None = None) -> np.ndarray:
    """One dermatoscopy-like RGB image of class ``dx``; images with one ``lesion_seed`` show one lesion.

    ``ambiguity`` in [0, 1]: the largest share of the lesion's signature taken from a look-alike
    class (:func:`lesion_style`). ``variety``: the lesion shows one of its class's looks, the image
    the nuisance variation (module doc); ``None``: neither.
    """
    lesion = np.random.default_rng(lesion_seed)
    # The third stream draws the look-alike: the first two, and so the unmixed images, stay as they were.
    outline_rng, texture_rng, look_alike_rng = lesion.spawn(3)
    style = lesion_style(dx, look_alike_rng, ambiguity)
    if variety is not None:  # streams of their own: the draws above and below stay those without variety
        style = subtype_style(style, dx, variety.subtype(np.random.default_rng([lesion_seed, 1])), variety.seed)
        nuisance, n = np.random.default_rng([image_seed, 1]), variety.nuisance
    skin = np.array([224.0, 186.0, 162.0]) * lesion.uniform(0.78, 1.04) + lesion.normal(0, 6, 3)
    colour = np.array(style.colour, dtype=np.float64) * lesion.uniform(0.85, 1.15) + lesion.normal(0, 8, 3)
    radius = lesion.uniform(*style.radius)

    shot = np.random.default_rng(image_seed)  # this image's view of the lesion
    u, v = _grid(height, width)
    angle = shot.uniform(0, 2 * np.pi)
    cx, cy = shot.uniform(-0.15, 0.15, 2)
    scale = radius * shot.uniform(0.9, 1.1)
    if variety is not None:  # position, scale and skin tone
        cx, cy = np.array([cx, cy]) + nuisance.uniform(-0.3 * n, 0.3 * n, 2)
        scale *= nuisance.uniform(1 - 0.3 * n, 1 + 0.3 * n)
        skin = skin * nuisance.uniform(1 - 0.25 * n, 1 + 0.06 * n) + nuisance.normal(0, 12 * n, 3)
    # lesion coordinates, in lesion radii: the texture turns and moves with the lesion
    x = ((u - cx) * np.cos(angle) + (v - cy) * np.sin(angle)) / scale
    y = (-(u - cx) * np.sin(angle) + (v - cy) * np.cos(angle)) / scale
    edge = 0.05 / scale
    mask = np.clip(
        (_wobble(outline_rng, np.arctan2(y, x), style.irregular) - np.hypot(x, y)) / edge + 0.5, 0, 1
    )
    lesion_rgb, mask = _ham_texture(style.texture, texture_rng, x, y, colour, mask)

    img = skin * (1 - mask[..., None]) + lesion_rgb * mask[..., None]
    img *= (1 - 0.12 * (u**2 + v**2) / 2)[..., None]  # dermatoscope vignetting
    for _ in range(shot.integers(0, 3)):  # hairs
        t = shot.uniform(0, np.pi)
        d = np.abs(u * np.sin(t) - v * np.cos(t) - shot.uniform(-0.8, 0.8))
        img = np.where((d < shot.uniform(0.015, 0.03))[..., None], np.array([60.0, 42.0, 32.0]), img)
    if variety is not None:  # more vignetting, an illumination gradient, more hairs
        img *= (1 - nuisance.uniform(0, 0.3 * n) * (u**2 + v**2) / 2)[..., None]
        phi = nuisance.uniform(0, 2 * np.pi)
        img *= (1 + nuisance.uniform(0, 0.3 * n) * (u * np.cos(phi) + v * np.sin(phi)) / 2)[..., None]
        for _ in range(nuisance.integers(0, 1 + round(4 * n))):
            t = nuisance.uniform(0, np.pi)
            d = np.abs(u * np.sin(t) - v * np.cos(t) - nuisance.uniform(-0.8, 0.8))
            img = np.where((d < nuisance.uniform(0.015, 0.03))[..., None], np.array([60.0, 42.0, 32.0]), img)
    img = img * shot.uniform(0.9, 1.1) + shot.normal(0, 4, img.shape)
    if variety is not None:
        img = img + nuisance.normal(0, 8 * n, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _ham_texture(kind, rng, x, y, colour, mask):
    """A class's colour field over lesion coordinates ``x``, ``y`` (in lesion radii), and its mask."""
    r = np.hypot(x, y)
    base = np.broadcast_to(colour, x.shape + (3,)).copy()
    if kind == "smooth":  # nevus: even brown, a little darker in the middle
        base *= (1 + 0.06 * _waves(rng, 4, (0.5, 1))(x, y) - 0.12 * np.clip(1 - r, 0, 1))[..., None]
    elif kind == "blotches":  # melanoma: black, brown and blue-grey areas
        field = _waves(rng, 6, (0.6, 1.4))(x, y)
        base = np.where((field > 0.5)[..., None], np.array([28.0, 22.0, 24.0]), base)
        base = np.where((field < -0.6)[..., None], np.array([96.0, 104.0, 132.0]), base)
    elif kind == "ridges":  # keratosis: waxy cerebriform ridges
        t = rng.uniform(0, np.pi)
        bend = 0.8 * _waves(rng, 3, (0.5, 1))(x, y)
        base *= (1 + 0.25 * np.sin(2 * np.pi * 2.5 * (x * np.cos(t) + y * np.sin(t)) + bend))[..., None]
    elif kind == "vessels":  # basal cell carcinoma: pearly pink with thin branching red vessels
        vessels = np.abs(_waves(rng, 5, (0.8, 1.6))(x, y)) < 0.3
        base = np.where(vessels[..., None], np.array([176.0, 36.0, 48.0]), base)
    elif kind == "scaly":  # actinic keratosis: red with white scales
        scales = _waves(rng, 8, (2.5, 4))(x, y) > 0.9
        base = np.where(scales[..., None], np.array([236.0, 226.0, 214.0]), base)
    elif kind == "scar":  # dermatofibroma: brown ring around a pale centre
        centre = np.clip(1.6 - 2.2 * r, 0, 1)[..., None]
        base = base * (1 - centre) + np.array([232.0, 212.0, 196.0]) * centre
    elif kind == "lacunae":  # vascular lesion: a cluster of round red-purple lakes
        mask = np.zeros_like(x)
        for _ in range(rng.integers(3, 7)):
            cx, cy = rng.uniform(-0.55, 0.55, 2)
            mask = np.maximum(
                mask, np.clip((rng.uniform(0.25, 0.45) - np.hypot(x - cx, y - cy)) / 0.08, 0, 1)
            )
        base *= (1 + 0.15 * _waves(rng, 4, (0.8, 1.6))(x, y))[..., None]
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return base, mask


def _write_ham_tree(cfg: SyntheticConfig, out: Path) -> None:
    rng = np.random.default_rng([cfg.seed, 0])
    counts = apportion(cfg.num_images, {c: HAM_COUNTS[c] for c in HAM_CLASSES}, minimum=4)
    lesions: list[tuple[str, int]] = []  # (dx, images of the lesion)
    for dx in HAM_CLASSES:
        left = counts[dx]
        while left:
            n = min(left, int(rng.choice(_LESION_SIZES, p=_LESION_SIZE_P)))
            lesions.append((dx, n))
            left -= n
    lesion_ids = rng.permutation(len(lesions))
    images = [(li, dx) for li, (dx, n) in enumerate(lesions) for _ in range(n)]
    order = rng.permutation(len(images))  # image ids do not follow the classes, as in the real set
    part_1 = round(len(images) * HAM_PART_1_SHARE)
    height, width = cfg.native_size, round(cfg.native_size * 4 / 3)
    variety = Variety.of(cfg)

    rows = []
    for parts_dir in HAM_PARTS:
        (out / parts_dir).mkdir()
    for n, i in enumerate(tqdm(order, desc="synthetic HAM10000", unit="img", leave=False)):
        li, dx = images[i]
        image_id = f"ISIC_{24306 + n:07d}"
        pixels = render_ham_image(
            dx, derive_seed(cfg.seed, 1, li), derive_seed(cfg.seed, 2, n), height, width, cfg.ambiguity, variety
        )
        path = out / HAM_PARTS[0 if n < part_1 else 1] / f"{image_id}.jpg"
        Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)
        meta = np.random.default_rng(derive_seed(cfg.seed, 3, li))
        rows.append(
            {
                "lesion_id": f"HAM_{lesion_ids[li]:07d}",
                "image_id": image_id,
                "dx": dx,
                "dx_type": _DX_TYPE[dx],
                "age": f"{5 * meta.integers(2, 18)}.0",
                "sex": meta.choice(["male", "female", "male", "female", "unknown"]),
                "localization": meta.choice(_SITES),
                "dataset": meta.choice(_ORIGINS),
            }
        )
    # The real file lists the images of a lesion together, ordered by diagnosis.
    meta = pd.DataFrame(rows, columns=list(HAM_COLUMNS)).sort_values(["dx", "lesion_id", "image_id"])
    meta.to_csv(out / HAM_METADATA, index=False)


# ------------------------------------------------------------------------- Brain Tumor MRI layout
@dataclass(frozen=True)
class _TumourLook:
    """One look of a tumour class (variety): what the mass looks like; where it sits stays the class's rule."""

    level: float  # the mass's intensity: darker or brighter than the brain (about 100)
    core: float | None  # a necrotic core's intensity (ring enhancement), or none
    speckle: float  # amplitude of the texture inside
    size: float  # factor on the radius
    stretch: float  # elongation (1: round)
    irregular: float  # outline wobble
    halo: float  # oedema around it (0: none)


@lru_cache(maxsize=4096)
def _tumour_look(tumour: str, k: int, seed: int) -> _TumourLook:
    rng = np.random.default_rng([seed, 12, BRAIN_CLASSES.index(tumour), k])
    dark, bright = rng.uniform(45, 80), rng.uniform(135, 235)
    level = float(dark if rng.random() < 0.3 else bright)
    core = float(rng.uniform(30, 90)) if rng.random() < 0.35 else None
    halo = float(rng.uniform(10, 35)) if rng.random() < 0.4 else 0.0
    return _TumourLook(level, core, float(rng.uniform(0, 30)), float(rng.uniform(0.75, 1.35)),
                       float(rng.uniform(1.0, 1.8)), float(rng.uniform(0.0, 0.35)), halo)


@lru_cache(maxsize=4096)
def _anatomy(k: int, seed: int) -> tuple[float, float, tuple[float, float]]:
    """Look ``k`` of a brain without a tumour (variety): ventricle size factor, gyri contrast and frequencies."""
    rng = np.random.default_rng([seed, 13, k])
    low = float(rng.uniform(2, 4))
    return float(rng.uniform(0.6, 1.7)), float(rng.uniform(8, 28)), (low, low + float(rng.uniform(1, 3)))


def render_brain_image(tumour: str, seed: int, height: int, width: int, ambiguity: float = 0.0,
                       variety: Variety | None = None) -> np.ndarray:
    """One axial MRI-like grayscale slice with a tumour of class ``tumour`` (or none).

    ``ambiguity`` in [0, 1], as for the HAM layout: a look-alike class is drawn among the others
    and a share ``s ~ U(0, ambiguity)`` of the tumour's placement and size is taken from it, with
    probability ``s`` its appearance too; a tumour that looks like "notumor" fades to ``1 - s``, and
    a slice without a tumour shows the look-alike's at ``s``. ``variety``: the slice shows one of its
    class's looks (a look-alike's tumour one of its own), under the nuisance variation (module doc);
    ``None``: neither.
    """
    rng = np.random.default_rng(seed)
    # A separate stream for the look-alike: with ambiguity 0 the slices are the unmixed ones.
    look_alike = rng.spawn(1)[0]
    other = str(look_alike.choice([c for c in BRAIN_CLASSES if c != tumour]))
    share = look_alike.uniform(0, ambiguity)
    u, v = _grid(height, width)
    t = rng.uniform(-0.3, 0.3)
    s = rng.uniform(0.9, 1.08)
    shift_x = rng.uniform(-0.05, 0.05)
    shift_y = rng.uniform(-0.05, 0.05)
    ventricles, gyri_contrast, gyri_band, looks = 1.0, 16.0, (3, 6), {}
    if variety is not None:  # a stream of its own: the draws of ``rng`` stay those without variety
        vary, n = np.random.default_rng([seed, 1]), variety.nuisance
        k = variety.subtype(vary)
        looks = {c: _tumour_look(c, k if c == tumour else variety.subtype(vary), variety.seed)
                 for c in (tumour, other) if c != "notumor"}
        if tumour == "notumor":
            ventricles, gyri_contrast, gyri_band = _anatomy(k, variety.seed)
        t += vary.uniform(-np.pi * n, np.pi * n)
        s *= vary.uniform(1 - 0.25 * n, 1 + 0.2 * n)
        shift_x, shift_y = np.array([shift_x, shift_y]) + vary.uniform(-0.2 * n, 0.2 * n, 2)
        ventricles *= vary.uniform(1 - 0.3 * n, 1 + 0.4 * n)
    x = (u * np.cos(t) + v * np.sin(t)) / s + shift_x
    y = (-u * np.sin(t) + v * np.cos(t)) / s + shift_y
    a, b = rng.uniform(0.70, 0.80), rng.uniform(0.84, 0.94)
    r = np.hypot(x / a, y / b)

    gyri = _waves(rng, 6, gyri_band)(x, y)
    img = np.where(r < 1.0, 190.0, 0.0)  # skull and scalp fat
    img = np.where(r < 0.94, 40.0, img)  # cerebrospinal fluid
    img = np.where(r < 0.90, 100.0 + gyri_contrast * gyri, img)  # brain
    for side in (-1, 1):  # ventricles
        vx, vy = (x - side * 0.11) / (0.06 * ventricles), (y + 0.04) / (0.17 * ventricles)
        img = np.where(np.hypot(vx, vy) < 1, 38.0, img)

    own, other_shown = tumour != "notumor", other != "notumor" and share > 0
    if own or other_shown:
        place = _tumour_place(tumour, rng, a, b) if own else None
        if other != "notumor":
            alt = _tumour_place(other, look_alike, a, b)
            place = alt if place is None else tuple((1 - share) * p + share * q for p, q in zip(place, alt))
        kind = other if not own or (other != "notumor" and look_alike.random() < share) else tumour
        visible = 1 - share if other == "notumor" else (1.0 if own else share)
        outline_rng = rng if kind == tumour else look_alike  # the main stream's draws stay those of ambiguity 0
        mass = (_draw_look(img, looks[kind], place, x, y, r, gyri, outline_rng) if kind in looks
                else _draw_tumour(img, kind, place, x, y, r, gyri, outline_rng))
        img = (1 - visible) * img + visible * mass

    if variety is not None:  # a bias field, a textured background, another contrast
        img = img * (1 + 0.3 * n * _waves(vary, 3, (0.3, 0.8))(x, y))
        background = vary.uniform(0, 60 * n) + 20 * n * _waves(vary, 4, (1, 3))(u, v)
        img = np.where(r < 1.0, img, np.maximum(background, 0))
        img = 255 * (np.clip(img, 0, 255) / 255) ** vary.uniform(1 - 0.35 * n, 1 + 0.5 * n)
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 6, img.shape)
    if variety is not None:
        img = img + vary.normal(0, 8 * n, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw_look(img, look: _TumourLook, place, x, y, r, gyri, rng):
    """``img`` with a tumour of look ``look`` at ``place`` (centre x, centre y, the class's radius)."""
    tx, ty, rad = place
    theta = rng.uniform(0, 2 * np.pi)
    dx, dy = x - tx, y - ty
    along, across = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    q = np.hypot(along / look.stretch, across) / (rad * look.size * _wobble(rng, np.arctan2(dy, dx), look.irregular))
    if look.halo:
        img = np.where((q < 1.6) & (r < 0.9), img + look.halo * np.clip(1.6 - q, 0, 0.6) / 0.6, img)
    img = np.where(q < 1.0, look.level + look.speckle * gyri, img)
    return img if look.core is None else np.where(q < 0.6, look.core + 0.3 * look.speckle * gyri, img)


def _tumour_place(tumour: str, rng: np.random.Generator, a: float, b: float) -> tuple[float, float, float]:
    """Centre and radius of a tumour of class ``tumour`` in a brain of half-axes ``a``, ``b``."""
    if tumour == "glioma":  # inside the brain
        ang, dist, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.45), rng.uniform(0.14, 0.24)
    elif tumour == "meningioma":  # against the skull
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.12, 0.2)
        dist = 0.9 * min(a, b) - rad * 0.8
    else:  # pituitary: small, low in the midline (sella)
        ang, dist, rad = np.pi / 2 + rng.uniform(-0.1, 0.1), rng.uniform(0.42, 0.52) * b, rng.uniform(0.06, 0.09)
    return dist * np.cos(ang), dist * np.sin(ang), rad


def _draw_tumour(img, kind, place, x, y, r, gyri, rng):
    """``img`` with a tumour of appearance ``kind`` at ``place`` (centre x, centre y, radius)."""
    tx, ty, rad = place
    d = np.hypot(x - tx, y - ty)
    if kind == "glioma":  # irregular, ring-enhancing, necrotic core, oedema
        q = d / (rad * _wobble(rng, np.arctan2(y - ty, x - tx), 0.25))
        img = np.where((q < 1.6) & (r < 0.9), img + 28 * np.clip(1.6 - q, 0, 0.6), img)
        img = np.where(q < 1.0, 178.0, img)
        return np.where(q < 0.7, 62.0 + 10 * gyri, img)
    # meningioma: round, homogeneous, bright; pituitary: a little less bright
    return np.where(d < rad, (205.0 if kind == "meningioma" else 188.0) + 6 * gyri, img)


def _write_brain_tree(cfg: SyntheticConfig, out: Path) -> None:
    rng = np.random.default_rng([cfg.seed, 0])
    cells = {(split, c): n for split, per in BRAIN_COUNTS.items() for c, n in per.items()}
    counts = apportion(cfg.num_images, {f"{s}/{c}": n for (s, c), n in cells.items()}, minimum=3)
    written: dict[str, list[Path]] = {c: [] for c in BRAIN_CLASSES}
    variety = Variety.of(cfg)
    n = 0
    for key, count in tqdm(counts.items(), desc="synthetic brain MRI", leave=False):
        split, cls = key.split("/")
        folder = out / split / cls
        folder.mkdir(parents=True)
        prefix = f"{split[:2]}-{BRAIN_FILE_PREFIX[cls]}"
        # The real set copies a few training images into Testing: about 2 % of each test class here.
        copies = math.ceil(0.02 * count) if split == "Testing" else 0
        for j in range(count - copies):
            shape = rng.uniform(0.85, 1.15, 2) * cfg.native_size
            pixels = render_brain_image(
                cls, derive_seed(cfg.seed, 4, n), int(shape[0]), int(shape[1]), cfg.ambiguity, variety
            )
            img = Image.fromarray(pixels, "L")
            path = folder / f"{prefix}_{j:04d}.jpg"
            (img.convert("RGB") if rng.random() < 0.2 else img).save(path, quality=JPEG_QUALITY)
            if split == "Training":
                written[cls].append(path)
            n += 1
        for j, src in enumerate(rng.choice(written[cls], copies, replace=False) if copies else []):
            shutil.copyfile(src, folder / f"{prefix}_{count - copies + j:04d}.jpg")
