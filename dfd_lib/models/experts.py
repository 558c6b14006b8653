"""Experts and their mixture.

An expert is a timm backbone built by name with a 2-class head; its forward returns the
logits and the pooled pre-logits features (the features feed the NCE loss and the UMAP
notebook) from one backbone pass. The mixture scores an image as the mean of its experts'
softmax fake-probabilities (class 1), keeping each expert's probability available.

An expert may carry a localisation head (:mod:`dfd_lib.models.localisation`): its forward then also
returns ``"mask_logits"``, and the mixture's ``"mask"`` is the mean of its experts' maps.

The attribute name ``baseline_extractor`` is the released checkpoint's key layout
(``<i>.baseline_extractor.<timm key>``); keeping it lets those weights load unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from timm.utils import ModelEmaV3
from torch import nn

from dfd_lib.data.manifest import FAKE
from dfd_lib.data.preprocess import untile
from dfd_lib.models.backbones import canonical_backbone_name, create_backbone
from dfd_lib.models.localisation import build_head, feature_grid, mask_map

# The 7 experts of the released checkpoint, in checkpoint order (docs/method.md).
ORIGINAL_BACKBONES: tuple[str, ...] = (
    "convnextv2_tiny.fcmae_ft_in1k",
    "convnextv2_tiny.fcmae_ft_in1k",
    "tf_efficientnet_b4.ns_jft_in1k",
    "tf_efficientnet_b4.ns_jft_in1k",
    "tf_efficientnet_b5.ns_jft_in1k",
    "tf_efficientnet_b5.ns_jft_in1k",
    "tf_efficientnet_b6.ns_jft_in1k",
)
NUM_CLASSES = 2
FAKE_CLASS = FAKE  # the head's class index of "fake" is the manifest's fake label
DEFAULT_EMA_DECAY = 0.995


class Expert(nn.Module):
    """A timm backbone with a 2-class head; ``forward`` returns ``{"logits", "features"}``, and
    ``"mask_logits"`` ``(B, 1, h, w)`` when it has a localisation head (``localisation_head``: its kind)."""

    def __init__(
        self,
        backbone: str,
        pretrained: bool = False,
        weights_path: str | None = None,
        drop_rate: float = 0.0,
        localisation_head: str | None = None,
    ):
        super().__init__()
        self.backbone_name = canonical_backbone_name(backbone)
        # random weights unless pretrained or a local file asks for more (create_backbone says where they come from)
        self.baseline_extractor = create_backbone(self.backbone_name, pretrained=pretrained or weights_path is not None,
                                                  num_classes=NUM_CLASSES, weights_path=weights_path, drop_rate=drop_rate)
        self.weights_source = self.baseline_extractor.weights_source  # where the starting weights came from
        self.head_kind = localisation_head or None  # None: no head, the released key layout exactly
        self.localisation_head = None if self.head_kind is None else build_head(self.head_kind, self.num_features)

    @property
    def num_features(self) -> int:
        return int(self.baseline_extractor.num_features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.baseline_extractor
        # pre_logits=True returns the pooled (and, in training, dropped-out) features that
        # timm would feed its classifier, so logits == net(x) while the backbone runs once.
        feature_map = net.forward_features(x)
        features = net.forward_head(feature_map, pre_logits=True)
        logits = net.get_classifier()(features)
        if self.localisation_head is None:
            return {"logits": logits, "features": features}
        return {"logits": logits, "features": features, "mask_logits": self.localisation_head(feature_grid(net, feature_map))}


class MixtureOfExperts(nn.Module):
    """Experts scored together: ``prob`` is the mean of their softmax class-1 probabilities; when every
    expert has a localisation head, ``mask`` ``(B, S, S)`` is the mean of their maps, each upsampled to
    the side ``S`` of the largest expert input.

    ``input_sizes`` (one side per expert) says the input is tiled: each expert takes its own square
    of it (:class:`dfd_lib.data.preprocess.TiledTransform`), for experts that differ in input size or
    normalisation; None (the default): every expert takes the whole input."""

    def __init__(self, experts: Sequence[Expert], input_sizes: Sequence[int] | None = None):
        super().__init__()
        if len(experts) == 0:
            raise ValueError("a mixture needs at least one expert")
        self.experts = nn.ModuleList(experts)
        self.input_sizes = input_sizes

    @property
    def input_sizes(self) -> list[int] | None:
        return self._input_sizes

    @input_sizes.setter
    def input_sizes(self, sizes: Sequence[int] | None) -> None:
        if sizes is not None and len(sizes) != len(self.experts):
            raise ValueError(f"{len(sizes)} input sizes for {len(self.experts)} experts")
        self._input_sizes = None if sizes is None else [int(s) for s in sizes]

    def expert_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each expert's input in the batch ``x``."""
        return [x] * len(self.experts) if self._input_sizes is None else untile(x, self._input_sizes)

    @property
    def backbones(self) -> list[str]:
        return [expert.backbone_name for expert in self.experts]

    @property
    def head_kind(self) -> str | None:
        """The experts' localisation head kind, None without heads (a mixture has heads on all experts or none)."""
        kinds = {expert.head_kind for expert in self.experts}
        if len(kinds) > 1:
            raise ValueError(f"the experts' localisation heads differ: {sorted(map(str, kinds))}")
        return kinds.pop()

    def forward(self, x: torch.Tensor, maps: bool = True) -> dict[str, torch.Tensor]:
        """``prob``, ``expert_probs`` and ``logits``; with localisation heads and ``maps``, also ``mask``."""
        inputs = self.expert_inputs(x)
        outputs = [expert(xi) for expert, xi in zip(self.experts, inputs)]
        logits = torch.stack([out["logits"] for out in outputs], dim=1)  # (B, E, 2)
        expert_probs = logits.float().softmax(dim=-1)[..., FAKE_CLASS]  # (B, E)
        result = {"prob": expert_probs.mean(dim=1), "expert_probs": expert_probs, "logits": logits}
        if maps and self.head_kind is not None:
            side = max(xi.shape[-1] for xi in inputs)
            result["mask"] = torch.stack([mask_map(out["mask_logits"], side) for out in outputs], dim=1).mean(dim=1)
        return result

    def load_released_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a state dict in the released layout (``<i>.baseline_extractor.<timm key>``,
        the keys of an ``nn.ModuleList`` of experts) into ``self.experts``."""
        return self.experts.load_state_dict(state_dict, strict=strict, assign=assign)


def build_mixture(
    backbones: Sequence[str] = ORIGINAL_BACKBONES,
    pretrained: bool = False,
    weights_paths: Sequence[str | None] | None = None,
    drop_rate: float = 0.0,
    localisation_head: str | None = None,
) -> MixtureOfExperts:
    """One expert per backbone name, in order (default: the released 7-expert architecture), each with a
    localisation head of kind ``localisation_head`` (None: none)."""
    if weights_paths is not None and len(weights_paths) != len(backbones):
        raise ValueError(f"{len(weights_paths)} weights paths given for {len(backbones)} backbones")
    paths = list(weights_paths) if weights_paths is not None else [None] * len(backbones)
    return MixtureOfExperts(
        [Expert(name, pretrained=pretrained, weights_path=path, drop_rate=drop_rate, localisation_head=localisation_head)
         for name, path in zip(backbones, paths)]
    )


def create_ema(model: nn.Module, decay: float = DEFAULT_EMA_DECAY, **kwargs) -> ModelEmaV3:
    """An exponential moving average of ``model``'s weights (timm ``ModelEmaV3``); call
    ``ema.update(model, step=...)`` after each optimiser step and evaluate ``ema.module``."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    return ModelEmaV3(model, decay=decay, **kwargs)
