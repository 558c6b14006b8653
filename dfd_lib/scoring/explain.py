"""Why an image scored high: Grad-CAM heatmaps over the experts of a mixture.

Each expert gets its own Grad-CAM (the ``grad-cam`` package) for the *fake* class on the
last spatial feature map of its backbone; the mixture's map is the mean of the experts'
maps, as the mixture's score is the mean of their probabilities. Maps are computed on the
model input (``image_size`` x ``image_size``) and stretched back over the original image.

The target layer is found by running the backbone once and taking the module whose output
*is* the feature map ``forward_features`` returns, so any timm backbone works without a
table of layer names per architecture. A vision transformer's ``forward_features`` returns tokens,
not a map: its Grad-CAM is taken on the input of its last block (the last block's first norm, the
usual choice for ViTs: a class-token model's final norm passes no gradient to the patch tokens), the
patch tokens reshaped to their grid. A mixture whose experts take their own input sizes (a tiled input,
:class:`dfd_lib.data.preprocess.TiledTransform`) gives each expert's map at its own size, stretched to
the largest before they are averaged.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from dfd_lib.core.figures import save_figure
from dfd_lib.data.images import ImageSource, load_rgb
from dfd_lib.models.backbones import takes_native_input
from dfd_lib.models.checkpoints import MixtureConfig
from dfd_lib.models.experts import FAKE_CLASS, Expert, MixtureOfExperts
from dfd_lib.models.localisation import patch_grid
from dfd_lib.scoring.predictor import Predictor

DEFAULT_ALPHA = 0.45  # weight of the heatmap over the image
DEFAULT_MAX_SIDE = 512  # overlays are drawn at most this large (a display, not an analysis)
_PROBE_SIZE = 64  # input side used once to locate an expert's feature map


@dataclass
class Explanation:
    """One image's scores and heatmaps: ``cam`` (S x S, in [0, 1]) is the mixture's map,
    ``expert_cams`` one map per expert, in expert order."""

    prob: float
    expert_probs: list[float]
    cam: np.ndarray
    expert_cams: list[np.ndarray] = field(default_factory=list)


class _ExpertLogits(nn.Module):
    """An expert as a plain logits model, the shape the grad-cam package expects."""

    def __init__(self, expert: Expert):
        super().__init__()
        self.expert = expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(x)["logits"]


def target_layer(net: nn.Module, size: int = _PROBE_SIZE) -> nn.Module:
    """The outermost module of ``net`` whose output is the feature map ``forward_features``
    returns (the last spatial map before pooling); for a vision transformer, its last block's first
    norm (see the module's docstring). ``size``: the input side to probe a backbone with (a ViT's own)."""
    if takes_native_input(net):
        last = net.blocks[-1] if hasattr(net, "blocks") and len(net.blocks) else None
        if last is not None and isinstance(getattr(last, "norm1", None), nn.Module):
            return last.norm1
    outputs: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, _inp, out: outputs.append((m, out)))
        for module in net.modules() if module is not net
    ]
    try:
        param = next(net.parameters())
        probe = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            features = net.forward_features(probe)
    finally:
        for hook in hooks:
            hook.remove()
    if isinstance(features, torch.Tensor) and features.dim() == 3 and takes_native_input(net):  # tokens: the final norm's
        same = [module for module, out in outputs if out is features]
        if same:
            return same[-1]
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        raise ValueError(f"{type(net).__name__}: forward_features does not return a 4-D feature map; Grad-CAM needs one")
    same = [module for module, out in outputs if out is features]
    if same:
        return same[-1]  # hooks fire inner-first, so the last is the outermost
    spatial = [module for module, out in outputs if isinstance(out, torch.Tensor) and out.shape == features.shape]
    if not spatial:
        raise ValueError(f"{type(net).__name__}: no module outputs the final feature map; cannot place Grad-CAM")
    return spatial[-1]


def token_grid(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """grad-cam's ``reshape_transform`` for a vision transformer: ``(B, N, D)`` tokens -> ``(B, D, h, w)``,
    the prefix tokens (class, registers) dropped, the patch tokens on their square grid."""
    prefix = int(getattr(net, "num_prefix_tokens", 1))

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return patch_grid(tokens, prefix, type(net).__name__)

    return reshape


def expert_gradcam(expert: Expert, batch: torch.Tensor) -> np.ndarray:
    """One expert's Grad-CAM maps for the fake class on its own input ``(B, 3, S, S)``: ``(B, S, S)`` in [0, 1]."""
    net = expert.baseline_extractor
    reshape = token_grid(net) if takes_native_input(net) else None
    # the weights are frozen, so the input carries the graph the gradients flow through
    batch = batch.detach().clone().requires_grad_(True)
    layer = target_layer(net, batch.shape[-1] if takes_native_input(net) else _PROBE_SIZE)
    with torch.enable_grad(), GradCAM(_ExpertLogits(expert), [layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(FAKE_CLASS)] * len(batch)).astype(np.float32)


def _stretched(maps: np.ndarray, side: int) -> np.ndarray:
    if maps.shape[-1] == side:
        return maps
    return np.stack([cv2.resize(m, (side, side), interpolation=cv2.INTER_LINEAR) for m in maps])


def gradcam_maps(model: MixtureOfExperts, batch: torch.Tensor, experts: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM maps for the fake class: ``(B, E', S, S)`` float32 in [0, 1] for the experts
    ``experts`` (default: all). ``batch`` is preprocessed ``(B, 3, S, S)`` (or tiled: each expert's map
    at its own size, stretched to the largest ``S``)."""
    indices = list(range(len(model.experts))) if experts is None else list(experts)
    for i in indices:
        if not 0 <= i < len(model.experts):
            raise ValueError(f"expert {i} does not exist: the mixture has experts 0..{len(model.experts) - 1}")
    inputs = model.expert_inputs(batch)
    maps = [expert_gradcam(model.experts[i], inputs[i].contiguous()) for i in indices]
    side = max(m.shape[-1] for m in maps)
    return np.stack([_stretched(m, side) for m in maps], axis=1).astype(np.float32)


def _as_predictor(predictor_or_model: Predictor | MixtureOfExperts, config: MixtureConfig | None) -> Predictor:
    if isinstance(predictor_or_model, Predictor):
        return predictor_or_model
    if isinstance(predictor_or_model, MixtureOfExperts):
        if config is None:
            raise ValueError("explaining a bare MixtureOfExperts needs its MixtureConfig (image size, mean, std)")
        device = next(predictor_or_model.parameters()).device
        return Predictor(predictor_or_model, config, device=device, channels_last=False)
    raise TypeError(f"expected a Predictor or a MixtureOfExperts, got {type(predictor_or_model).__name__}")


def explain_tensor(predictor: Predictor, tensor: torch.Tensor, experts: Sequence[int] | None = None) -> Explanation:
    """Scores (the Predictor's exact forward) and heatmaps of one preprocessed ``(3, S, S)`` image."""
    scores = predictor.predict_tensor(tensor[None])
    maps = gradcam_maps(predictor.model, tensor[None].to(predictor.device), experts)[0]
    return Explanation(
        prob=float(scores["prob"][0]),
        expert_probs=[float(p) for p in scores["expert_probs"][0]],
        cam=maps.mean(axis=0),
        expert_cams=list(maps),
    )


def explain(
    predictor_or_model: Predictor | MixtureOfExperts,
    image: ImageSource,
    experts: Sequence[int] | None = None,
    config: MixtureConfig | None = None,
) -> Explanation:
    """Score ``image`` (a path, bytes, PIL image or array) and compute its heatmaps."""
    predictor = _as_predictor(predictor_or_model, config)
    return explain_tensor(predictor, predictor.load_tensor(image), experts)


def overlay_heatmap(
    image: ImageSource,
    cam: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> Image.Image:
    """``cam`` (any size, values in [0, 1]) as a jet heatmap over ``image``, shrunk so its
    longer side is at most ``max_side``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = load_rgb(image)
    if max_side is not None and max(rgb.size) > max_side:
        rgb = rgb.copy()
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    base = np.asarray(rgb, dtype=np.float32) / 255.0
    heat = cv2.resize(np.asarray(cam, dtype=np.float32), (rgb.width, rgb.height), interpolation=cv2.INTER_LINEAR)
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    return Image.fromarray(show_cam_on_image(base, heat, use_rgb=True, image_weight=1.0 - alpha))


def gradcam_overlay(
    predictor_or_model: Predictor | MixtureOfExperts,
    image: ImageSource,
    expert: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    max_side: int | None = DEFAULT_MAX_SIDE,
    config: MixtureConfig | None = None,
) -> Image.Image:
    """The mixture's heatmap (or expert ``expert``'s) over ``image`` as a PIL image."""
    result = explain(predictor_or_model, image, None if expert is None else [expert], config)
    return overlay_heatmap(image, result.cam, alpha, max_side)


def plot_heatmaps(predictor: Predictor, images: Sequence[ImageSource], path=None, columns: int = 4, max_side: int = 256):
    """Grad-CAM overlays of ``images`` in a grid, titled with the mixture's and each expert's
    fake probability; saved to ``path`` when given."""
    import matplotlib.pyplot as plt  # deferred: pyplot is slow to import

    count = max(len(images), 1)
    width = min(columns, count)
    rows = -(-count // width)
    fig, axes = plt.subplots(rows, width, figsize=(3.2 * width, 3.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image in zip(axes.ravel(), images):
        result = explain(predictor, image)
        ax.imshow(overlay_heatmap(image, result.cam, max_side=max_side))
        name = Path(image).name[:28] if isinstance(image, (str, os.PathLike)) else type(image).__name__
        experts = " ".join(f"{p:.2f}" for p in result.expert_probs)
        ax.set_title(f"{name}\np(fake)={result.prob:.3f}  experts [{experts}]", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
