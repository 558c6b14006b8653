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


def tile_origins(sizes: Sequence[int]) -> list[int]:
    """The top row of each expert's input in a tiled input (:class:`TiledTransform`): stacked
    downwards in expert order, each in the left columns."""
    tops, top = [], 0
    for size in sizes:
        tops.append(top)
        top += int(size)
    return tops


def tiled_shape(sizes: Sequence[int]) -> tuple[int, int, int]:
    """``(3, H, W)`` of the tiled input of experts whose input sides are ``sizes``."""
    return 3, sum(int(s) for s in sizes), max(int(s) for s in sizes)


def untile(x: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """The experts' ``(B, 3, S_i, S_i)`` inputs inside a tiled ``(B, 3, H, W)`` batch (views, no copy)."""
    return [x[:, :, top : top + size, :size] for top, size in zip(tile_origins(sizes), sizes)]


class TiledTransform:
    """HxWx3 uint8 RGB -> one ``(3, H, W)`` tensor holding every expert's own input: a mixture whose
    experts differ in input size or normalisation (a ViT at 224 px beside CNNs at 512 px) still takes a
    single tensor per image, so batching, the runtimes and the server stay the same code. Expert ``i``'s
    input (``transforms[i]`` of the image, exactly what it was trained on) is the ``S_i`` x ``S_i``
    square at row :func:`tile_origins` ``[i]``, column 0; the rest is zeros. The mixture cuts it out
    again (:func:`untile`)."""

    def __init__(self, transforms: Sequence[InputTransform]):
        if not transforms:
            raise ValueError("a tiled input needs at least one expert's transform")
        self.transforms = list(transforms)
        self.sizes = [t.image_size for t in self.transforms]
        self.shape = tiled_shape(self.sizes)

    @property
    def image_size(self) -> int:
        """The largest expert input side."""
        return max(self.sizes)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        out = torch.zeros(self.shape)
        for transform, top, size in zip(self.transforms, tile_origins(self.sizes), self.sizes):
            out[:, top : top + size, :size] = transform(rgb)
        return out
