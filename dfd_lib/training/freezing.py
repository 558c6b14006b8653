"""Freezing the first stages of a backbone: fine-tuning only the last stages of a pretrained
backbone is far cheaper on a CPU (the backward pass stops where the trainable part begins, and the
early stages run at the highest resolution)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models import group_parameters

from dfd_lib.models.experts import Expert


def backbone_stage_groups(expert: Expert) -> list[list[str]]:
    """The backbone's parameter names in timm's coarse stage groups, input side first: the
    stem, one group per stage, the head last (``group_matcher(coarse=True)``)."""
    net = expert.baseline_extractor
    groups = group_parameters(net, net.group_matcher(coarse=True))
    return [groups[key] for key in sorted(groups)]


def freeze_backbone_stages(expert: Expert, n_stages: int) -> list[torch.nn.Module]:
    """Freeze the first ``n_stages`` stage groups of ``expert`` (:func:`backbone_stage_groups`):
    no gradients, and their BatchNorm statistics fixed. Returns the modules that must stay in
    eval mode while the rest trains (see :func:`train_mode`)."""
    if n_stages == 0:
        return []
    groups = backbone_stage_groups(expert)
    if n_stages >= len(groups):
        raise ValueError(f"freeze_stages={n_stages}, but {expert.backbone_name} has {len(groups)} stage groups "
                         f"(stem, stages, head); at most {len(groups) - 1} can be frozen: the head always trains")
    frozen_names = {f"baseline_extractor.{name}" for group in groups[:n_stages] for name in group}
    for name, param in expert.named_parameters():
        if name in frozen_names:
            param.requires_grad_(False)
    return frozen_modules(expert)


def frozen_modules(expert: Expert) -> list[torch.nn.Module]:
    """The outermost modules of ``expert`` whose parameters are all frozen (it has some): eval() keeps
    their BatchNorm statistics (and any dropout or drop-path inside them) fixed while the rest trains."""
    frozen = []
    for name, module in expert.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) and not any(name.startswith(f"{outer}.") for outer in frozen):
            frozen.append(name)
    return [expert.get_submodule(name) for name in frozen]


def train_mode(model: torch.nn.Module, frozen: Sequence[torch.nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()
