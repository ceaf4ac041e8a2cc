"""Train-time augmentation (SPEC §4) on ``uint8`` tensors; float only at the end (normalisation).

The operations of the official code — RandomRotation(180) (nearest, black corners), horizontal
and vertical flips, ColorJitter(brightness, contrast) in random order, RandomAdjustSharpness(2)
with p = 0.5, GaussianBlur(3) with sigma in [0.1, 2] — with torchvision's parameter
distributions, configured by :class:`~hdkd.config.AugmentConfig`, in two forms:

- :func:`augment_image`: one ``uint8`` 3 x H x W image, with ``torchvision.transforms.v2``'s
  functional kernels. :func:`train_transform` adds normalisation; it is what
  :class:`~hdkd.data.loader.PackedDataset` calls, with a generator seeded from
  (seed, epoch, index), so that a sample's augmentation never depends on the worker, the batch
  or the order it is loaded in.
- :func:`augment_batch`: a whole ``uint8`` batch on any device (``augment.batched``, the
  training default), every image with its own parameters, in a few batched kernels; equal to
  :func:`augment_image` for the same parameters up to float rounding; :class:`BatchAugment` is
  the training loop's batch hook around it.

Parameters are drawn by :func:`sample_params` from an explicit ``torch.Generator`` (never from
torch's global RNG), the same way for both forms.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from hdkd.config import AugmentConfig
from hdkd.data.seeding import derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_SIGMA = (0.1, 2.0)  # torchvision's GaussianBlur default range


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` (…, 3, H, W) -> contiguous float32, scaled to [0, 1] and normalised (ImageNet mean/std).

    Equal to ``TF.normalize(TF.to_dtype(x, float32, scale=True), mean, std)`` up to float rounding,
    in one conversion pass and one fused multiply-add (1.5x faster per image).
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    scale, shift = _normalisation(images.device)
    return images.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).add_(shift)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def sample_params(n: int, cfg: AugmentConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Parameters of ``n`` augmentations, drawn as torchvision's v2 transforms draw theirs."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)

    def coin() -> torch.Tensor:
        return torch.rand(n, generator=generator, device=generator.device) < 0.5

    # Always drawn in this order, so switching one step off does not change the others' draws.
    return {
        "angle": uniform(-cfg.rotation, cfg.rotation),
        "hflip": coin(),
        "vflip": coin(),
        "brightness": uniform(1 - cfg.brightness, 1 + cfg.brightness),
        "contrast": uniform(1 - cfg.contrast, 1 + cfg.contrast),
        "brightness_first": coin(),  # ColorJitter applies its adjustments in a random order
        "sharpen": coin(),
        "sigma": uniform(*BLUR_SIGMA),
    }


def augment_image(image: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment one ``uint8`` 3 x H x W image with torchvision's v2 kernels; returns ``uint8``."""
    p = {k: v.item() for k, v in sample_params(1, cfg, generator).items()}
    x = image
    if cfg.rotation:
        x = TF.rotate(x, p["angle"])
    if cfg.hflip and p["hflip"]:
        x = TF.horizontal_flip(x)
    if cfg.vflip and p["vflip"]:
        x = TF.vertical_flip(x)
    jitter = []
    if cfg.brightness:
        jitter.append(lambda t: TF.adjust_brightness(t, p["brightness"]))
    if cfg.contrast:
        jitter.append(lambda t: TF.adjust_contrast(t, p["contrast"]))
    for op in jitter if p["brightness_first"] else jitter[::-1]:
        x = op(x)
    with native_cpu_convolution():
        if cfg.sharpness not in (0, 1) and p["sharpen"]:
            x = TF.adjust_sharpness(x, cfg.sharpness)
        if cfg.blur_kernel:
            x = TF.gaussian_blur(x, [cfg.blur_kernel] * 2, [p["sigma"]] * 2)
    return x


class _Transform:
    """``uint8`` 3 x H x W -> normalised float32; augmented first when built with a config."""

    def __init__(self, cfg: AugmentConfig | None):
        self.cfg = cfg

    @property
    def random(self) -> bool:
        """Whether a call needs a generator (PackedDataset only makes one then)."""
        return self.cfg is not None

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.cfg is not None:
            if generator is None:
                raise ValueError("an augmenting transform needs a torch.Generator")
            image = augment_image(image, self.cfg, generator)
        return normalize(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg!r})"


def train_transform(cfg: AugmentConfig) -> Callable[..., torch.Tensor]:
    """Per-image training transform ``(uint8 image, generator) -> float32``.

    Normalisation only when ``cfg.enabled`` is false.
    """
    return _Transform(cfg if cfg.enabled else None)


def eval_transform() -> Callable[..., torch.Tensor]:
    """Per-image evaluation transform: normalisation only."""
    return _Transform(None)


@contextlib.contextmanager
def native_cpu_convolution() -> Iterator[None]:
    """Use ATen's own CPU convolution instead of oneDNN's inside the block.

    Blur and sharpness are 3x3 depthwise convolutions of one small image, where oneDNN is
    slow: 2.5 ms against 0.19 ms for a 3x224x224 image on the 2-core development machine, which
    made the whole augmentation 2.8x slower. Only the enabled flag is touched.
    """
    enabled = torch.backends.mkldnn.set_flags(False, None, None, None)[0]
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(enabled, None, None, None)


# --------------------------------------------------------------------------- batched form
def apply_batch_params(
    images: torch.Tensor, params: dict[str, torch.Tensor], cfg: AugmentConfig
) -> torch.Tensor:
    """Augment a ``uint8`` B x 3 x H x W batch, image ``i`` with ``params[...][i]``; returns ``uint8``."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a uint8 B x C x H x W batch, got {images.dtype} {tuple(images.shape)}")
    p = {k: v.to(images.device) for k, v in params.items()}

    def per_image(mask: torch.Tensor) -> torch.Tensor:
        return mask.view(-1, 1, 1, 1)

    x = images
    if cfg.rotation:
        x = _rotate(x, p["angle"])
    if cfg.hflip:
        x = torch.where(per_image(p["hflip"]), TF.horizontal_flip(x), x)
    if cfg.vflip:
        x = torch.where(per_image(p["vflip"]), TF.vertical_flip(x), x)
    if cfg.brightness or cfg.contrast:
        b = (lambda t: _brightness(t, p["brightness"])) if cfg.brightness else (lambda t: t)
        c = (lambda t: _contrast(t, p["contrast"])) if cfg.contrast else (lambda t: t)
        x = torch.where(per_image(p["brightness_first"]), c(b(x)), b(c(x)))
    with native_cpu_convolution():
        if cfg.sharpness not in (0, 1):
            x = torch.where(per_image(p["sharpen"]), TF.adjust_sharpness(x, cfg.sharpness), x)
        if cfg.blur_kernel:
            x = _gaussian_blur(x, cfg.blur_kernel, p["sigma"])
    return x


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a ``uint8`` B x 3 x H x W batch on its device, each image with its own random parameters.

    ``generator`` may live on the CPU whatever the batch's device; the result is ``uint8``
    (call :func:`normalize` next). A disabled augmentation returns the batch unchanged.
    """
    if not cfg.enabled:
        return images
    return apply_batch_params(images, sample_params(len(images), cfg, generator), cfg)


class BatchAugment:
    """The training batch hook of ``augment.batched``: :func:`augment_batch` then :func:`normalize`.

    Its draws depend only on (seed, rank, epoch) — :meth:`set_epoch` selects them, as
    :meth:`PackedDataset.set_epoch <hdkd.data.loader.PackedDataset.set_epoch>` does per sample —
    so a resumed run augments exactly as an uninterrupted one would, with no generator state to save.
    """

    def __init__(self, cfg: AugmentConfig, seed: int, rank: int = 0):
        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.generator = torch.Generator()  # on the CPU: parameters are few, and drawing them never syncs a GPU
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(derive_seed(self.seed, self.rank, epoch))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(augment_batch(images, self.cfg, self.generator))


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """``TF.rotate`` (nearest, black fill) with one angle per image, in one ``grid_sample``."""
    b, _, h, w = x.shape
    rad = torch.deg2rad(degrees.double())
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # torchvision's inverse affine matrix for a rotation by +angle about the centre
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).float().view(b, 2, 3)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], dim=-1)
    half_size = torch.full((2,), 0.5 * w, device=x.device)  # fills, not a host copy: no GPU sync per batch
    half_size[1] = 0.5 * h
    scaled = theta.transpose(1, 2) / half_size
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(factor.view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    gray = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_()
    mean = gray.mean(dim=(-2, -1)).view(-1, 1, 1, 1)
    f = factor.view(-1, 1, 1, 1)
    return (x.mul(f) + mean * (1.0 - f)).clamp_(0, 255).to(torch.uint8)


def _gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """``TF.gaussian_blur`` (reflect padding, rounded back to uint8) with one sigma per image."""
    b, c, h, w = x.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=kernel_size, device=x.device)
    k1 = torch.softmax(-(t[None, :] / sigma[:, None].float()).pow(2), dim=1)  # B x k
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, dim=0)[:, None]  # (B*C) x 1 x k x k
    pad = kernel_size // 2
    padded = F.pad(x.float(), [pad, pad, pad, pad], mode="reflect").view(1, b * c, h + 2 * pad, w + 2 * pad)
    return F.conv2d(padded, k2, groups=b * c).view(b, c, h, w).round_().to(torch.uint8)
