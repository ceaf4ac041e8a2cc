"""Decoding: every odd-but-valid image becomes correct RGB; broken files raise UnreadableImage."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hdkd.data.errors import UnreadableImage
from hdkd.data.images import decode_resized, to_rgb


def _decode(path: Path, size: int = 8) -> tuple[np.ndarray, str]:
    return decode_resized(lambda: Image.open(path), size, str(path))


def _rgb_of(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(to_rgb(img))


def test_grayscale_becomes_equal_channels(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    rgb = _rgb_of(tmp_path / "g.png")
    assert rgb.shape == (8, 8, 3) and all((rgb[..., c] == gray).all() for c in range(3))


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257 * 100, 65535, 257 * 200]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")  # a 16-bit grayscale PNG
    with Image.open(tmp_path / "w.png") as img:
        assert img.mode.startswith("I")
    assert _rgb_of(tmp_path / "w.png")[0, :, 0].tolist() == [0, 100, 255, 200]


def test_sixteen_bit_rgb_png(tmp_path):
    # Pillow cannot write 48-bit PNGs; this is one, written by hand (2x1 pixels: red, blue).
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"\x00" + struct.pack(">6H", 65535, 0, 0, 0, 0, 65535)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    (tmp_path / "rgb48.png").write_bytes(png)
    assert _rgb_of(tmp_path / "rgb48.png").tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_rgba_is_composited_over_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert _rgb_of(tmp_path / "a.png").tolist() == [[[200, 100, 50], [0, 0, 0], [100, 50, 25]]]


def test_gray_with_alpha(tmp_path):
    Image.fromarray(np.array([[[90, 255], [90, 0]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    assert _rgb_of(tmp_path / "la.png").tolist() == [[[90, 90, 90], [0, 0, 0]]]


def test_palette_and_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    img.putdata([0, 1])
    img.save(tmp_path / "p.png")
    assert _rgb_of(tmp_path / "p.png").tolist() == [[[10, 20, 30], [250, 0, 0]]]
    img.save(tmp_path / "pt.gif", transparency=0)
    assert _rgb_of(tmp_path / "pt.gif").tolist() == [[[0, 0, 0], [250, 0, 0]]]


def test_cmyk_jpeg(tmp_path):
    colour = (180, 60, 30)
    Image.new("RGB", (16, 16), colour).convert("CMYK").save(tmp_path / "c.jpg", quality=98)
    with Image.open(tmp_path / "c.jpg") as img:
        assert img.mode == "CMYK"
    rgb = _rgb_of(tmp_path / "c.jpg")
    assert np.abs(rgb.astype(int) - colour).max() <= 6


def test_one_bit(tmp_path):
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    assert _rgb_of(tmp_path / "b.png").tolist() == [[[255, 255, 255], [0, 0, 0]]]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif, quality=95)
    # 3: rotate 180 (red goes right); 6: 90 clockwise (red on top); 8: counter-clockwise (red at the bottom)
    red_at = {
        3: (slice(None), slice(30, 40)),
        6: (slice(0, 10), slice(None)),
        8: (slice(30, 40), slice(None)),
    }[orientation]
    rgb = _rgb_of(tmp_path / "o.jpg")
    assert rgb.shape == ((20, 40, 3) if orientation == 3 else (40, 20, 3))
    assert (rgb[red_at][..., 0] > 200).all() and (rgb[red_at][..., 2] < 60).all()
    square, _ = _decode(tmp_path / "o.jpg", size=16)  # the resized square keeps the orientation
    red_square = {
        3: (slice(None), slice(12, 16)),
        6: (slice(0, 4), slice(None)),
        8: (slice(12, 16), slice(None)),
    }[orientation]
    assert (square[red_square][..., 0] > 200).all()


def test_decode_resizes_to_a_square_and_hashes_pixels_not_containers(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    Image.fromarray(pixels).save(tmp_path / "x.bmp")
    a, hash_png = _decode(tmp_path / "x.png", size=12)
    b, hash_bmp = _decode(tmp_path / "x.bmp", size=12)
    assert a.shape == (12, 12, 3) and a.dtype == np.uint8 and (a == b).all()
    assert hash_png == hash_bmp
    Image.fromarray(pixels[::-1]).save(tmp_path / "y.png")
    assert _decode(tmp_path / "y.png")[1] != hash_png


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
        b"",
        b"not an image at all",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
    ],
    ids=["truncated-jpeg", "empty", "garbage", "broken-png"],
)
def test_unreadable_files_raise_unreadable_image(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage) as e:
        _decode(path)
    assert e.value.name == str(path) and e.value.reason


def test_a_float_tiff_in_unit_range_is_scaled_to_8_bits_not_decoded_black(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray.astype(np.float32) / 255, "F").save(tmp_path / "f.tif")  # 32-bit float, in [0, 1]
    with Image.open(tmp_path / "f.tif") as img:
        assert img.mode == "F"
    rgb, _ = _decode(tmp_path / "f.tif")
    assert all((rgb[..., c] == gray).all() for c in range(3))


@pytest.mark.parametrize("values", [[0.0, 0.5, 300.0], [-0.5, 0.2, 0.9], [0.0, float("nan"), 1.0]])
def test_a_float_image_outside_unit_range_is_refused_with_its_range(tmp_path, values):
    Image.fromarray(np.array([values], dtype=np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(UnreadableImage) as caught:
        _decode(tmp_path / "f.tif")
    assert "f.tif" in str(caught.value) and "float" in caught.value.reason and "[0, 1]" in caught.value.reason
