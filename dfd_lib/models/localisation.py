"""Localisation heads: where an expert thinks an image was edited, as a map beside its verdict.

A head is a light decoder on the backbone's last feature map (``forward_features``: ``(B, C, h, w)`` for a
CNN; for a vision transformer its patch tokens laid out on their square grid, prefix tokens dropped). It
gives mask logits ``(B, 1, h, w)``; :func:`mask_map` upsamples them bilinearly to the input's size and
turns them into probabilities of "changed". Heads are built by name (:data:`HEAD_KINDS`):

- ``linear``: a 1x1 convolution to one channel;
- ``light``: a 3x3 convolution to 64 channels, ReLU, a 1x1 convolution to one channel.

An expert keeps its head under :data:`HEAD_PREFIX` (``localisation_head.*`` in its state dict), keys the
released-format loader never sees: an expert without one has exactly the released key layout.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

HEAD_PREFIX = "localisation_head"  # the Expert attribute, hence the state-dict prefix, of a head
_HIDDEN = 64  # channels of the light head's hidden layer


def _linear(channels: int) -> nn.Module:
    return nn.Conv2d(channels, 1, kernel_size=1)


def _light(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, _HIDDEN, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(_HIDDEN, 1, kernel_size=1))


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {"linear": _linear, "light": _light}
HEAD_KINDS: tuple[str, ...] = tuple(_BUILDERS)


def build_head(kind: str, channels: int) -> nn.Module:
    """A head of ``kind`` (:data:`HEAD_KINDS`) on a feature map of ``channels`` channels."""
    if kind not in _BUILDERS:
        raise ValueError(f"localisation head must be one of {HEAD_KINDS}, got {kind!r}")
    return _BUILDERS[kind](int(channels))


def patch_grid(tokens: torch.Tensor, prefix: int, owner: str = "the backbone") -> torch.Tensor:
    """``(B, N, D)`` tokens -> ``(B, D, h, w)``: the first ``prefix`` tokens (class, registers) dropped, the
    patch tokens on their square grid."""
    patches = tokens[:, prefix:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{owner}: {patches.shape[1]} patch tokens do not form a square grid")
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[-1]).permute(0, 3, 1, 2)


def feature_grid(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The output of ``net.forward_features`` as a ``(B, C, h, w)`` map (a CNN's as it is, a ViT's tokens on their grid)."""
    if features.ndim == 4:
        return features
    if features.ndim == 3:
        return patch_grid(features, int(getattr(net, "num_prefix_tokens", 1)), type(net).__name__)
    raise ValueError(f"{type(net).__name__}: forward_features gave a {features.ndim}-D tensor; a head needs a feature map")


def mask_map(mask_logits: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Mask logits ``(B, 1, h, w)`` -> probabilities of "changed" ``(B, S, S)`` (or ``(B, H, W)``) at ``size``."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    logits = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.sigmoid()[:, 0]
