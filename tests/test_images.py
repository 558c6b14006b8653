"""Every odd image the kit may meet decodes to 8-bit RGB the same way, or fails clearly."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dfd_lib.data.images import ImageLoadError, image_size, load_rgb, try_load_rgb


def _photo(width=40, height=30) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(_photo(40, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    loaded = load_rgb(path)
    assert loaded.size == (30, 40)
    assert image_size(path) == (30, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(_photo())
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    elif mode == "I":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) / 255.0)
    else:
        image = rgb.convert(mode)
    suffix = {"CMYK": ".jpg", "F": ".tiff", "I": ".tiff"}.get(mode, ".png")
    path = tmp_path / f"img{suffix}"
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    grey = np.asarray(rgb.convert("L")).astype(float)
    if mode in ("L", "I;16", "I", "F"):
        # high bit depths are scaled down, not clipped to white
        assert np.abs(np.asarray(loaded)[..., 0].astype(float) - grey).mean() < 2.0


def test_rgba_transparency_flattens_onto_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    loaded = np.asarray(load_rgb(rgba))
    assert tuple(loaded[0, 0]) == (200, 0, 0)
    assert tuple(loaded[3, 3]) == (255, 255, 255)


def test_sources_bytes_pil_and_arrays_agree(tmp_path):
    array = _photo()
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    from_path = np.asarray(load_rgb(path))
    assert np.array_equal(from_path, np.asarray(load_rgb(path.read_bytes())))
    assert np.array_equal(from_path, np.asarray(load_rgb(Image.open(path))))
    assert np.array_equal(from_path, np.asarray(load_rgb(array)))
    assert np.array_equal(from_path, np.asarray(load_rgb(array.astype(np.float32) / 255.0)))


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_photo(200, 200)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_rgb(path)


@pytest.mark.parametrize("content, reason", [(b"", "empty"), (b"hello, not an image", "not an image")])
def test_non_images_are_refused(tmp_path, content, reason):
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    image, why = try_load_rgb(path)
    assert image is None and reason in why


def test_missing_file_and_bomb(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_rgb(tmp_path / "nope.png")
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(path)
    with pytest.raises(ImageLoadError, match="too large"):
        load_rgb(path, max_pixels=1_000_000)
    assert load_rgb(path, max_pixels=None).size == (3000, 3000)


def test_header_claiming_a_giant_image_is_refused_before_decoding():
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # a PNG header claiming 20000 x 20000 pixels (400 M, past Pillow's own bomb limit) and no pixel data
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    image, reason = try_load_rgb(data)
    assert image is None and ("bomb" in reason or "too large" in reason)
    with pytest.raises(ImageLoadError):
        load_rgb(data, max_pixels=None)
