"""Exact rewrites of the experts before conversion: the same weights computing the same function in
a form CPU runtimes run faster. Only the copy of the mixture loaded to be converted is changed
(:mod:`dfd_lib.scoring.export`); the torch mixture the kit scores and trains with never is.

timm's ConvNeXt block permutes its NCHW input to NHWC for its LayerNorm and the two ``nn.Linear``
layers of its MLP (with ConvNeXt-V2's global response normalisation between them), then permutes
back. Rewritten, the LayerNorm normalises over the channel axis in place and the Linear layers run as
1x1 convolutions on the same weights, so a runtime keeps one memory layout through the block: no
transposes and none of the layout reorders around them. timm's ``LayerNorm2d`` (stem, downsampling
layers) loses its two permutes the same way. Measured with OpenVINO on the 2-core dev CPU at 512 px:
convnextv2_tiny 248 -> 210 ms, the released 7-expert mixture 7-8 % faster (bench/RESULTS.md).

Tried and left out: folding per-image scales (the squeeze-and-excitation gate of EfficientNet blocks,
GRN's scale) into the next 1x1 convolution's weights saves a pass over the widest activation but makes
those weights inputs of the graph, which OpenVINO then reorders on every inference: slower in the
mixture (1.09 s/img against 1.05 for these rewrites alone).

Only blocks whose structure is exactly what a rewrite assumes are touched, and :func:`rewrite_verified`
compares the mixture's logits and probabilities before and after on a random input (fp32 rounding
only), undoing everything if they differ.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.mlp import GlobalResponseNorm, GlobalResponseNormMlp, Mlp
from timm.layers.norm import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock
from torch import nn

PROB_TOLERANCE = 1e-5  # largest change of an expert's probability on the check input: the backends' contract with torch
LOGIT_TOLERANCE = 1e-4  # largest change of a logit, relative to 1 + the largest logit (fp32 rounding: about 1e-6)
log = logging.getLogger(__name__)


def layer_norm_channels_first(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm`` (a LayerNorm over channels) applied to an NCHW tensor without permuting it."""
    centred = x - x.mean(1, keepdim=True)
    x = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        x = x * norm.weight.view(1, -1, 1, 1)
    if norm.bias is not None:
        x = x + norm.bias.view(1, -1, 1, 1)
    return x


def linear_as_1x1_conv(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` applied to the channels of an NCHW tensor."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class ChannelsFirstLayerNorm(nn.Module):
    """timm's ``LayerNorm2d`` without its two permutes."""

    def __init__(self, norm: LayerNorm2d):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_channels_first(x, self.norm)


class ChannelsFirstConvNeXtBlock(nn.Module):
    """A timm ConvNeXt block (V1 or V2, MLP in channels-last Linear layers) computed in NCHW throughout."""

    def __init__(self, block: ConvNeXtBlock):
        super().__init__()
        self.block = block

    @staticmethod
    def applies(block: nn.Module) -> bool:
        if type(block) is not ConvNeXtBlock or block.use_conv_mlp or not isinstance(block.norm, nn.LayerNorm):
            return False
        mlp = block.mlp
        if type(mlp) not in (Mlp, GlobalResponseNormMlp) or not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
            return False
        if type(mlp) is Mlp:
            return isinstance(mlp.norm, nn.Identity)
        return type(mlp.grn) is GlobalResponseNorm and mlp.grn.channel_dim == -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, mlp = self.block, self.block.mlp
        shortcut = x
        x = layer_norm_channels_first(block.conv_dw(x), block.norm)
        x = mlp.drop1(mlp.act(linear_as_1x1_conv(x, mlp.fc1)))
        if isinstance(mlp, GlobalResponseNormMlp):
            x = global_response_norm_channels_first(x, mlp.grn)
        x = mlp.drop2(linear_as_1x1_conv(x, mlp.fc2))
        if block.gamma is not None:
            x = x.mul(block.gamma.reshape(1, -1, 1, 1))
        return block.drop_path(x) + block.shortcut(shortcut)


def global_response_norm_channels_first(x: torch.Tensor, grn: GlobalResponseNorm) -> torch.Tensor:
    """timm's GlobalResponseNorm (ConvNeXt-V2) with NCHW shapes."""
    x_g = x.norm(p=2, dim=(2, 3), keepdim=True)
    x_n = x_g / (x_g.mean(dim=1, keepdim=True) + grn.eps)
    return x + torch.addcmul(grn.bias.view(1, -1, 1, 1), grn.weight.view(1, -1, 1, 1), x * x_n)


@dataclass
class Rewrites:
    """What :func:`rewrite` replaced, so that it can be undone."""

    replaced: list[tuple[nn.Module, str, nn.Module]]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(type(getattr(parent, name)).__name__ for parent, name, _ in self.replaced))

    def undo(self) -> None:
        for parent, name, original in reversed(self.replaced):
            setattr(parent, name, original)
        self.replaced.clear()


def rewritten(module: nn.Module) -> nn.Module | None:
    """The rewrite of ``module``, or None when no rewrite applies to it."""
    if ChannelsFirstConvNeXtBlock.applies(module):
        return ChannelsFirstConvNeXtBlock(module)
    if type(module) is LayerNorm2d:
        return ChannelsFirstLayerNorm(module)
    return None


def rewrite(model: nn.Module) -> Rewrites:
    """Replace, in place, every block of ``model`` a rewrite applies to."""
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = rewritten(child)
            if new is not None:
                setattr(parent, name, new)
                replaced.append((parent, name, child))
    return Rewrites(replaced)


def rewrite_verified(mixture: nn.Module, image_size: int | tuple[int, int, int], seed: int = 0) -> dict[str, int]:
    """:func:`rewrite` the mixture (``{"logits", "expert_probs", ...}`` out), then check on a random
    input (``image_size`` square, or of shape ``(3, H, W)``: a tiled input) that its logits and probabilities
    are unchanged up to fp32 rounding; if not, undo it (the export is then converted as it is) and say so.
    Returns how many modules of each kind were rewritten."""
    shape = (3, image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = mixture(x)
        rewrites = rewrite(mixture)
        if not rewrites.replaced:
            return {}
        after = mixture(x)
    prob_change = (after["expert_probs"] - before["expert_probs"]).abs().max().item()
    logit_change = ((after["logits"] - before["logits"]).abs().max() / (1 + before["logits"].abs().max())).item()
    if prob_change > PROB_TOLERANCE or logit_change > LOGIT_TOLERANCE:
        log.warning("the export rewrites changed the mixture's outputs (probability by %.1e, logits by %.1e relative): "
                    "converting it unchanged", prob_change, logit_change)
        rewrites.undo()
        return {}
    return rewrites.counts
