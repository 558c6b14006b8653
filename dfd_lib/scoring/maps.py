"""Localisation maps (issue 28) as arrays, pictures and files: what ``dfd predict --maps``, ``dfd serve``'s
``/explain?map=`` and notebook 05's widget show of a mixture with localisation heads.

A map is the mixture's mask (the mean of its experts' heads' maps, ``(S, S)`` on the model input) stretched
back over the image: ``(H, W)`` float32 in [0, 1], 1 = edited. As a file it is an 8-bit greyscale PNG at
the image's resolution, 255 = edited. It says where the heads *predict* an edit, learnt from the kit's own
factory masks (docs/method.md, "Localisation"); it is no proof of where an image was edited.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfd_lib.core.atomic import atomic_write

HEATMAP_KINDS = ("grad-cam", "localisation")
HEATMAP_LABELS = {  # what the page and the widget call each kind of heatmap
    "localisation": "where it was edited (localisation head)",
    "grad-cam": "where the experts looked (Grad-CAM)",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_CHARS = 60  # most characters of the source's name kept in a map's file name
_HASH_CHARS = 12  # hex digits of the source path's hash: what keeps two names apart


def full_resolution(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An ``(S, S)`` (or tiled ``(h, w)``) mask stretched to ``size`` = (height, width): float32 in [0, 1]."""
    stretched = torch.nn.functional.interpolate(mask.float()[None, None], size=tuple(size), mode="bilinear",
                                                align_corners=False)
    return stretched[0, 0].clamp(0, 1).cpu().numpy()


def map_image(localisation: np.ndarray) -> Image.Image:
    """A map as an 8-bit greyscale picture, 255 = edited."""
    levels = np.rint(np.clip(np.nan_to_num(localisation), 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(levels, mode="L")


def map_file_name(source: str | os.PathLike) -> str:
    """The map file's name for ``source``: its name made safe, then a hash of its whole path, so two sources
    with the same name in different folders (or names that differ only in unsafe characters) never share one."""
    path = str(source)
    stem = _UNSAFE.sub("_", Path(path).stem)[:_STEM_CHARS].strip("._") or "image"
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_CHARS]
    return f"{stem}-{digest}.png"


def write_map(directory: str | os.PathLike, source: str | os.PathLike, localisation: np.ndarray) -> Path:
    """Write ``source``'s map into ``directory`` (atomically: a run resumed after a kill never finds half a
    file) and return its path."""
    picture = map_image(localisation)
    return atomic_write(Path(directory) / map_file_name(source), lambda tmp: picture.save(tmp, format="PNG"))


def read_map(path: str | os.PathLike) -> np.ndarray:
    """A map file back as float32 in [0, 1]."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
