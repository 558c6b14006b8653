"""Model inputs: the one preprocessing that training, validation, notebook 04's scoring, ``dfd predict``
and the server share.

The order is the original release's (docs/method.md): 8-bit RGB to [0, 1], normalise with the
backbone's mean and std, then resize the whole image to ``image_size`` x ``image_size`` with
antialiasing. Training inserts its random crop and flip between normalising and resizing
(:class:`dfd_lib.data.datasets.ManifestDataset`), so a validation AUC is the AUC ``dfd predict`` gives.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bilinear", "bicubic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputTransform:
    """HxWx3 uint8 RGB -> normalised ``(3, S, S)`` float tensor."""

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 interpolation: str = "bilinear", antialias: bool = True):
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.antialias = antialias
        self._mean = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
        self._std = torch.tensor([float(v) for v in std]).view(3, 1, 1)

    def normalise(self, rgb: np.ndarray) -> torch.Tensor:
        """``(3, H, W)`` in normalised units, at the image's own size."""
        rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else rgb.copy()  # torch wants writable memory
        x = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)
        return (x - self._mean) / self._std

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` -> ``(3, S, S)``: the whole image, squeezed to a square."""
        size = (self.image_size, self.image_size)
        return F.interpolate(x[None], size=size, mode=self.interpolation, align_corners=False, antialias=self.antialias)[0]

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        return self.resize(self.normalise(rgb))
