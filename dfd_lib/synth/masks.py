"""Manipulation masks: which pixels of a made image the factory changed.

A mask is a single-channel PNG of its image's size, 255 where the image was manipulated and 0
elsewhere; the manifest names it in its ``mask`` column (:data:`dfd_lib.data.manifest.MASK`). The kinds
of :mod:`dfd_lib.synth.kinds` decide what each family's mask is: the pixels a local edit changed
(:func:`changed_pixels`), the whole image for a regeneration (:func:`whole_image`), the region an
inpainting repainted (:func:`region`), or none (reals and label-keeping degradations of reals).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dfd_lib.data.images import ImageLoadError, load_rgb
from dfd_lib.data.manifest import MASK

MASKS_DIR = "masks"  # a folder of images keeps its masks in masks/, mirroring it (no family may take the name)
CHANGED, UNCHANGED = 255, 0


def changed_pixels(before: Image.Image, after: Image.Image) -> Image.Image:
    """255 where any channel of ``after`` differs from ``before`` (both RGB of one size), else 0: exactly
    the pixels an edit changed, a feathered edge included wherever its blend moved a value."""
    if before.size != after.size:
        raise ValueError(f"cannot compare a {before.width}x{before.height} image with a {after.width}x{after.height} one")
    differs = (np.asarray(before.convert("RGB")) != np.asarray(after.convert("RGB"))).any(axis=2)
    return Image.fromarray(np.where(differs, CHANGED, UNCHANGED).astype(np.uint8), mode="L")


def whole_image(size: tuple[int, int]) -> Image.Image:
    """The mask of an image a model made anew: every pixel."""
    return Image.new("L", size, CHANGED)


def region(mask: Image.Image) -> Image.Image:
    """A soft mask (e.g. an inpainting mask) as a manipulation mask: 255 wherever it is nonzero."""
    return Image.fromarray(np.where(np.asarray(mask.convert("L")) > 0, CHANGED, UNCHANGED).astype(np.uint8), mode="L")


def mask_path_for(root: str | os.PathLike, image_path: str | os.PathLike) -> Path:
    """Where the mask of the image at ``image_path`` (below ``root``) is written: the same place below
    ``root/masks``, as a PNG. A folder of images stays a folder of images only."""
    relative = Path(image_path).relative_to(root)
    return Path(root) / MASKS_DIR / relative.with_suffix(".png")


def source_mask(source: Mapping | None, size: tuple[int, int]) -> Image.Image | None:
    """The mask a source row brings in its ``mask`` column (None when it has none), checked against ``size``."""
    value = (source or {}).get(MASK)
    if value is None or (not isinstance(value, str) and pd.isna(value)) or str(value) == "":
        return None
    try:
        mask = region(load_rgb(value))
    except ImageLoadError as exc:
        raise ImageLoadError(f"mask {value}: {exc.reason}") from exc
    if mask.size != tuple(size):
        raise ValueError(f"mask {value} is {mask.width}x{mask.height} but its image is {size[0]}x{size[1]}")
    return mask
