"""What of an expert trains (``TrainConfig.tuning``), for foundation backbones (a CLIP, SigLIP, DINOv2 or
EVA-02 ViT) as much as for the method's CNNs:

- ``full``: every weight (the method's; nothing here touches the expert);
- ``frozen``: the backbone frozen (its modules kept in eval mode, so dropout and batch-norm statistics
  stay fixed), only the new 2-class head trains: a linear probe trained with the method's losses;
- ``lora``: low-rank adapters (LoRA through ``peft``: ``W + (alpha / r) B A``, ``A`` and ``B`` of rank
  ``r``, ``B`` starting at zero) on every linear layer of the backbone (a ViT's attention ``qkv`` /
  ``proj`` and MLP ``fc1`` / ``fc2``) and the head train; the backbone's own weights stay frozen;
- ``effort``: Effort's orthogonal-subspace tuning of the self-attention layers (the residual of their SVD,
  :mod:`dfd_lib.training.effort`) and the head train; the rest of the backbone stays frozen.

What is saved is always a plain timm state dict: LoRA's adapters are merged into the weights they adapt
(:func:`merged_expert`, peft's ``merge`` of each adapted layer, as ``merge_and_unload`` does), Effort's
principal and residual parts summed, so a saved expert or mixture loads and scores without peft.

Some attention modules (timm's EVA, BEiT, Swin V2 with separate q/v biases) read ``qkv.weight`` instead of
calling ``qkv``: adapted, they are told to call it (``qkv_bias_separate``, the same sum), so the adapter counts.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dfd_lib.models.experts import Expert
from dfd_lib.training.effort import SVDResidualLinear, add_effort
from dfd_lib.training.freezing import frozen_modules
from dfd_lib.training.train_config import TUNINGS

FOUNDATION_EXTRA = "pip install dfd-kit[foundation]  (or: pip install peft)"


def _head_names(expert: Expert) -> set[str]:
    """The parameter names (in ``expert``) of the backbone's classifier head and of the expert's localisation
    head, if it has one (both are new: they train in every tuning)."""
    heads = [expert.baseline_extractor.get_classifier(), expert.localisation_head]
    ids = {id(p) for head in heads if head is not None for p in head.parameters()}
    return {name for name, p in expert.named_parameters() if id(p) in ids}


def freeze_all_but_head(expert: Expert) -> None:
    head = _head_names(expert)
    if not head:
        raise ValueError(f"{expert.backbone_name} has no classifier head to train")
    for name, param in expert.named_parameters():
        param.requires_grad_(name in head)


def lora_targets(expert: Expert) -> list[str]:
    """The backbone's linear layers (names in the timm model) but its head: where LoRA's adapters go."""
    net = expert.baseline_extractor
    head = {id(m) for m in net.get_classifier().modules()}
    return [name for name, module in net.named_modules() if isinstance(module, nn.Linear) and id(module) not in head]


def add_lora(expert: Expert, rank: int, alpha: int) -> int:
    """LoRA adapters of rank ``rank`` (scale ``alpha / rank``) on :func:`lora_targets`, in place; only
    they and the head train. Returns how many layers were adapted."""
    try:
        from peft import LoraConfig, inject_adapter_in_model  # deferred: optional (the foundation extra), pulls in transformers
    except ImportError as exc:
        raise ImportError(f"tuning 'lora' needs peft, which is not installed ({exc.name or 'peft'} missing): "
                          f"{FOUNDATION_EXTRA}") from None
    targets = lora_targets(expert)
    if not targets:
        raise ValueError(f"tuning 'lora' adapts a backbone's linear layers, and {expert.backbone_name} has none besides "
                         "its head: use tuning 'full' or 'frozen'")
    freeze_all_but_head(expert)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets),
                            expert.baseline_extractor)
    head = _head_names(expert)
    for name, param in expert.named_parameters():  # peft marks only its adapters trainable: the head trains too
        if ".lora_" in name or name in head:
            param.requires_grad_(True)
    _call_qkv(expert.baseline_extractor)
    return len(targets)


def add_effort_tuning(expert: Expert, rank: int) -> int:
    """Effort's residual of rank ``rank`` on the self-attention layers (:mod:`dfd_lib.training.effort`); only it and
    the head train. Returns how many layers were decomposed."""
    freeze_all_but_head(expert)
    count = add_effort(expert.baseline_extractor, rank)
    if not count:
        raise ValueError(f"tuning 'effort' decomposes the linear layers of a backbone's self-attention, and "
                         f"{expert.backbone_name} has none: use it with a vision transformer")
    _call_qkv(expert.baseline_extractor)
    return count


def _call_qkv(net: nn.Module) -> None:
    """Attention modules with separate q/v biases that read ``qkv.weight`` directly: make them call ``qkv``."""
    for module in net.modules():
        if getattr(module, "qkv_bias_separate", True) is False and getattr(module, "q_bias", None) is not None:
            module.qkv_bias_separate = True


def apply_tuning(expert: Expert, tuning: str, lora_rank: int = 8, lora_alpha: int = 16, effort_rank: int = 1) -> list[nn.Module]:
    """Set what of ``expert`` trains (the module's docstring); returns the modules that stay in eval mode
    while the rest trains (:func:`dfd_lib.training.freezing.train_mode`)."""
    if tuning not in TUNINGS:
        raise ValueError(f"tuning must be one of {TUNINGS}, got {tuning!r}")
    if tuning == "full":
        return []
    if tuning == "frozen":
        freeze_all_but_head(expert)
    elif tuning == "effort":
        add_effort_tuning(expert, effort_rank)
    else:
        add_lora(expert, lora_rank, lora_alpha)
    return frozen_modules(expert)


def _adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # peft's adapted layers carry get_base_layer() and merge() (peft.tuners.tuners_utils.BaseTunerLayer)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, SVDResidualLinear)
            or (hasattr(module, "get_base_layer") and hasattr(module, "merge") and module.get_base_layer() is not module)]


def merged_expert(expert: Expert) -> Expert:
    """``expert`` itself when it has no adapters; else a copy with each LoRA layer merged into its base
    weight and replaced by it (peft's ``merge``, then the plain layer: what ``merge_and_unload`` does) and
    each Effort layer replaced by its summed weight, so its state dict has the plain timm keys and it runs
    without peft."""
    if not _adapted_layers(expert):
        return expert
    merged = copy.deepcopy(expert)
    with torch.no_grad():
        for name, layer in _adapted_layers(merged):
            if isinstance(layer, SVDResidualLinear):
                plain = layer.merged()
            else:
                layer.merge()
                plain = layer.get_base_layer()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, plain)
    return merged
