"""Decoding the images a dataset holds into RGB ``uint8`` arrays at the network's input size.

Real collections mix formats: camera JPEGs with an EXIF orientation tag, grayscale and 16-bit
PNGs, palette GIFs, CMYK JPEGs, RGBA screenshots. All of them become RGB here, the same way, so
that a label never depends on how a file happened to be saved. Files that cannot be decoded raise
:class:`UnreadableImage`; the caller quarantines them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from hdkd.data.errors import UnreadableImage

# torchvision's ImageFolder list, plus .webp: what the official code (and users' trees) may hold.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` upright and in RGB.

    - EXIF orientation is applied (cameras store the pixels unrotated plus a tag).
    - 16-bit (and 32-bit integer) grayscale is scaled from the 16-bit range to 8 bits, as the PNG
      format defines samples over the full range (``convert("L")`` would clip at 255).
    - Floating-point grayscale (a 32-bit float TIFF, mode ``F``) holds intensities in [0, 1], the
      convention of float images: scaled by 255. A float image with values outside [0, 1] (or NaN)
      has no range to scale from and is refused (``ValueError``, saying its range), rather than
      decoded clipped or black.
    - Transparent images are composited over black: dropping alpha would expose whatever colour
      the file keeps under transparent pixels.
    - Palette, 1-bit, grayscale, CMYK, YCbCr, ... go through Pillow's own conversion.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        low, high = (float(np.min(values)), float(np.max(values))) if values.size else (0.0, 0.0)
        if not (np.isfinite(values).all() and 0.0 <= low and high <= 1.0):
            shown = "NaN or infinite values" if not np.isfinite(values).all() else f"values in [{low:g}, {high:g}]"
            raise ValueError(f"a 32-bit float image with {shown}: float intensities must lie in [0, 1]; "
                             "save it with 8- or 16-bit integer samples, or scaled to [0, 1]")
        img = Image.fromarray(np.rint(values * 255.0).astype(np.uint8), "L")
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return img.convert("RGB")


def decode_resized(open_image: Callable[[], Image.Image], size: int, name: str) -> tuple[np.ndarray, str]:
    """Decode one image to RGB, resize it to ``size``×``size``; return it and its content hash.

    ``open_image`` returns a PIL image (lazily opened file or wrapped array); ``name`` is used in
    error messages. The hash (SHA-256 of the decoded full-resolution pixels and their shape)
    identifies duplicates whatever the file name or container format. Resizing squashes to a
    square with Pillow's antialiased bilinear filter, as ``torchvision.transforms.Resize((s, s))``
    does on PIL images in the official code.
    """
    rgb = _decode(open_image, name)
    pixels = np.asarray(rgb)
    digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
    return _square(rgb, size), digest


def load_resized(open_image: Callable[[], Image.Image], size: int, name: str) -> np.ndarray:
    """:func:`decode_resized` without the content hash (which costs a pass over the full-size pixels):
    how inference reads a new image."""
    return _square(_decode(open_image, name), size)


def _decode(open_image: Callable[[], Image.Image], name: str) -> Image.Image:
    try:
        with open_image() as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # Pillow's plugins raise many types (OSError, SyntaxError, struct.error, ...)
        raise UnreadableImage(name, f"{type(e).__name__}: {e}") from e


def _square(rgb: Image.Image, size: int) -> np.ndarray:
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
