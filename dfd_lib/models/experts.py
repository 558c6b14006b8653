"""Experts and their mixture.

An expert is a timm backbone built by name with a 2-class head; its forward returns the
logits and the pooled pre-logits features (the features feed the NCE loss and the UMAP
notebook) from one backbone pass. The mixture scores an image as the mean of its experts'
softmax fake-probabilities (class 1), keeping each expert's probability available.

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
    """A timm backbone with a 2-class head; ``forward`` returns ``{"logits", "features"}``."""

    def __init__(
        self,
        backbone: str,
        pretrained: bool = False,
        weights_path: str | None = None,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.backbone_name = canonical_backbone_name(backbone)
        # random weights unless pretrained or a local file asks for more (create_backbone says where they come from)
        self.baseline_extractor = create_backbone(self.backbone_name, pretrained=pretrained or weights_path is not None,
                                                  num_classes=NUM_CLASSES, weights_path=weights_path, drop_rate=drop_rate)
        self.weights_source = self.baseline_extractor.weights_source  # where the starting weights came from

    @property
    def num_features(self) -> int:
        return int(self.baseline_extractor.num_features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.baseline_extractor
        # pre_logits=True returns the pooled (and, in training, dropped-out) features that
        # timm would feed its classifier, so logits == net(x) while the backbone runs once.
        features = net.forward_head(net.forward_features(x), pre_logits=True)
        logits = net.get_classifier()(features)
        return {"logits": logits, "features": features}


class MixtureOfExperts(nn.Module):
    """Experts scored together: ``prob`` is the mean of their softmax class-1 probabilities.

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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = torch.stack([expert(xi)["logits"] for expert, xi in zip(self.experts, self.expert_inputs(x))], dim=1)  # (B, E, 2)
        expert_probs = logits.float().softmax(dim=-1)[..., FAKE_CLASS]  # (B, E)
        return {"prob": expert_probs.mean(dim=1), "expert_probs": expert_probs, "logits": logits}

    def load_released_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a state dict in the released layout (``<i>.baseline_extractor.<timm key>``,
        the keys of an ``nn.ModuleList`` of experts) into ``self.experts``."""
        return self.experts.load_state_dict(state_dict, strict=strict, assign=assign)


def build_mixture(
    backbones: Sequence[str] = ORIGINAL_BACKBONES,
    pretrained: bool = False,
    weights_paths: Sequence[str | None] | None = None,
    drop_rate: float = 0.0,
) -> MixtureOfExperts:
    """One expert per backbone name, in order (default: the released 7-expert architecture)."""
    if weights_paths is not None and len(weights_paths) != len(backbones):
        raise ValueError(f"{len(weights_paths)} weights paths given for {len(backbones)} backbones")
    paths = list(weights_paths) if weights_paths is not None else [None] * len(backbones)
    return MixtureOfExperts(
        [Expert(name, pretrained=pretrained, weights_path=path, drop_rate=drop_rate) for name, path in zip(backbones, paths)]
    )


def create_ema(model: nn.Module, decay: float = DEFAULT_EMA_DECAY, **kwargs) -> ModelEmaV3:
    """An exponential moving average of ``model``'s weights (timm ``ModelEmaV3``); call
    ``ema.update(model, step=...)`` after each optimiser step and evaluate ``ema.module``."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    return ModelEmaV3(model, decay=decay, **kwargs)
