"""Decoding any image the kit meets into 8-bit RGB, or a clear reason why not.

Every reader in the kit (manifests, features, training, inference, the HTTP API) goes
through :func:`load_rgb`, so an image decodes the same way everywhere: EXIF orientation
applied, greyscale / palette / RGBA / 16-bit / float / CMYK converted to RGB, truncated
files and decompression bombs refused with an :class:`ImageLoadError`.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # GIF, TIFF: the first frame
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000: past this a file is treated as a decompression bomb

# Never decode a truncated file silently as grey: a truncated image is an error we report.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]  # noqa: UP007 - a runtime alias for 3.10


class ImageLoadError(ValueError):
    """An image that cannot be used; ``reason`` says why in one line."""

    def __init__(self, reason: str, source: str = ""):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


def is_image_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit and float images to 8 bit by their value range instead of clipping."""
    arr = np.asarray(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (image.mode == "I" and arr.max(initial=0) > 255):
        scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr.astype(np.float64) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr)
    if image.mode == "I":
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if image.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0
        arr = (np.nan_to_num(arr, nan=lo) - lo) / max(hi - lo, 1e-12)
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8))
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is flattened onto white (what a viewer shows)."""
    image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"array of shape {arr.shape} is not an HxW, HxWx1, HxWx3 or HxWx4 image")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def load_rgb(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes, a PIL image or an HxWxC array, RGB order)
    into a fully loaded 8-bit RGB PIL image with EXIF orientation applied.

    Raises :class:`ImageLoadError` for missing, unreadable, truncated, non-image and
    oversized (more than ``max_pixels``) inputs.
    """
    name = _describe(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageLoadError("empty input (0 bytes)", name)
            stream = io.BytesIO(bytes(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError("file not found", name)
            if path.stat().st_size == 0:
                raise ImageLoadError("empty file (0 bytes)", name)
            stream = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream)
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"decompression bomb refused: {exc}", name) from None
        except UnidentifiedImageError:
            raise ImageLoadError("not an image (format not recognised)", name) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _decode_error(exc, name) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"image has no pixels ({width}x{height})", name)
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"image too large: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}",
            name,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"decompression bomb refused: {exc}", name) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_error(exc, name) from None


def _decode_error(exc: Exception, name: str) -> ImageLoadError:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return ImageLoadError(f"truncated or damaged image data ({text})", name)
    return ImageLoadError(f"cannot decode: {text}", name)


def try_load_rgb(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Image.Image | None, str]:
    """``(image, "")`` on success, ``(None, reason)`` on failure: for loops that skip and report."""
    try:
        return load_rgb(source, max_pixels=max_pixels), ""
    except ImageLoadError as exc:
        return None, exc.reason


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF rotation, without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
