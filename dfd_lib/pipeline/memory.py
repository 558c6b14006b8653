"""One expert's training memory, estimated before a run (``dfd check``): by backbone, tuning mode,
input side and micro-batch, without allocating the model (it is built on torch's meta device, where
a forward pass records shapes only and costs no memory).

Per tuning mode (``TrainConfig.tuning``; step 04's ``tunings``, one per backbone, empty = all full):

- ``full``: every weight trains: the weights, their gradients, AdamW's two moments and the EMA's copy
  (five float32 copies), plus the activations autograd keeps for the backward pass.
- ``frozen``: the backbone is frozen and only the 2-class linear head trains: the weights and the EMA's
  copy, the head's gradient and moments, and a forward pass's activations: autograd keeps nothing of
  the backbone, so what counts is the largest layer's input and output, alive at once.
- ``lora``: LoRA adapters of rank ``lora_rank`` on every ``nn.Linear`` of the backbone but the head
  (in a ViT: the attention's qkv and projection, the MLP's two layers), ``rank * (in + out)``
  parameters each: the weights with the adapters and the EMA's copy, the adapters' and the head's
  gradients and moments, and the activations the backward pass through the frozen backbone keeps
  (measured with the adapters in place).
- ``effort``: Effort's residual of rank ``effort_rank`` on each self-attention linear layer (``U``, ``S``
  and ``V`` per q/k/v block), and the head, train; the rest as for ``lora`` (the backward pass runs
  through the backbone's attention layers).

Activations are measured on the backbone at a small side and scaled to the input side (a backbone
that takes one side only, a ViT, is measured at that side), times the micro-batch with the enabled
loss terms' noisy copies; ``half``: autocast keeps them in 16 bits. For the CNNs of the full profile
this is within about 15 % below the peak measured on a CPU at 512 px; for a ViT at 224 px, where the
weights' states dominate, 1 % below (ViT-B/16) to 42 % above (ViT-L/14) one measured training step
(bench/RESULTS.md). Gradient checkpointing is not modelled: with it the figure is an upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfd_lib.models.backbones import backbone_data_config
from dfd_lib.models.experts import Expert
from dfd_lib.training.effort import attention_linears
from dfd_lib.training.losses import LossConfig
from dfd_lib.training.train_config import TUNINGS, TrainConfig

PROBE_SIZE = 64  # input side of the activation probe (a backbone of one fixed side: that side)
FLOAT32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """What one expert's training holds, in parameters and bytes."""

    weights: int  # parameters of the model, LoRA adapters included
    trainable: int  # parameters that train (everything, the head, or the adapters and the head)
    activations_per_image: float  # bytes autograd keeps (frozen: a forward pass's working set) per image, float32
    images: float  # images per micro-batch, the loss terms' noisy copies included
    side: int  # input side in pixels
    half: bool = False  # activations in 16 bits (autocast)

    @property
    def states(self) -> float:
        """Bytes of the weights and the EMA's copy of them, and the trainable ones' gradients and two AdamW moments."""
        return FLOAT32 * (2 * self.weights + 3 * self.trainable)

    @property
    def activations(self) -> float:
        return self.activations_per_image * self.images * (0.5 if self.half else 1.0)

    @property
    def total(self) -> float:
        return self.states + self.activations


def expert_tunings(params: dict) -> list[str]:
    """Each of step 04's backbones' tuning mode: ``tunings`` empty (or absent) = all full, one value = all,
    else one per backbone; a ValueError naming what does not fit."""
    backbones = list(params["backbones"])
    tunings = [str(t) for t in params.get("tunings") or []]
    unknown = sorted(set(tunings) - set(TUNINGS))
    if unknown:
        raise ValueError(f"unknown tuning mode(s) {unknown}; use {', '.join(TUNINGS)}")
    if len(tunings) > 1 and len(tunings) != len(backbones):
        raise ValueError(f"{len(tunings)} tunings for {len(backbones)} backbones: give one for all or one per backbone")
    return (tunings or ["full"]) * len(backbones) if len(tunings) <= 1 else tunings


def lora_targets(expert: Expert) -> list[nn.Linear]:
    """The layers LoRA adapts: every ``nn.Linear`` of the backbone but its classifier head."""
    head = expert.baseline_extractor.get_classifier()
    head_layers = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    return [m for m in expert.baseline_extractor.modules() if isinstance(m, nn.Linear) and id(m) not in head_layers]


def lora_parameters(expert: Expert, rank: int) -> int:
    """``rank * (in + out)`` for every adapted layer (LoRA's A: rank x in, B: out x rank)."""
    return sum(rank * (layer.in_features + layer.out_features) for layer in lora_targets(expert))


def effort_targets(expert: Expert) -> list[nn.Linear]:
    """The layers Effort decomposes: the backbone's self-attention linear layers (:mod:`dfd_lib.training.effort`)."""
    return [layer for _name, layer, _blocks in attention_linears(expert.baseline_extractor)]


def effort_parameters(expert: Expert, rank: int) -> int:
    """Effort's residual ``U`` (rows x k), ``S`` (k) and ``V`` (k x in) per row block of every decomposed layer."""
    return sum(blocks * rank * (layer.out_features // blocks + 1 + layer.in_features)
               for _name, layer, blocks in attention_linears(expert.baseline_extractor))


def expert_side(expert: Expert, image_size: int) -> tuple[int, bool]:
    """``(side, fixed)``: the side the expert trains at (its own for a backbone that takes one side only,
    timm's ``fixed_input_size``: a ViT) and whether it is fixed."""
    model = expert.baseline_extractor
    if getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False):
        return int(backbone_data_config(model)["input_size"][-1]), True
    return int(image_size), False


def estimate_training_memory(backbone: str, params: dict, tuning: str = "full", half: bool = False) -> MemoryEstimate:
    """One expert of ``backbone`` trained with step 04's ``params`` (image_size, batch_size,
    grad_accum_steps, the loss weights, lora_rank) in ``tuning`` mode."""
    if tuning not in TUNINGS:
        raise ValueError(f"unknown tuning mode {tuning!r}; use {', '.join(TUNINGS)}")
    with torch.device("meta"):
        expert = Expert(backbone, pretrained=False)
    side, fixed = expert_side(expert, int(params["image_size"]))
    rank = int(params.get("effort_rank") or TrainConfig.effort_rank) if tuning == "effort" else \
        int(params.get("lora_rank") or TrainConfig.lora_rank)
    base = sum(p.numel() for p in expert.parameters())
    head = sum(p.numel() for p in expert.baseline_extractor.get_classifier().parameters())
    adapters = {"lora": lora_parameters, "effort": effort_parameters}.get(tuning, lambda _expert, _rank: 0)(expert, rank)
    trainable = {"full": base, "frozen": head, "lora": adapters + head, "effort": adapters + head}[tuning]
    probe = side if fixed else PROBE_SIZE
    per_image = _activation_bytes(expert, probe, tuning, rank) * (side / probe) ** 2
    micro_batch = int(params["batch_size"]) // max(1, int(params.get("grad_accum_steps") or 1))
    images = micro_batch * (1 + LossConfig.from_params(params).memory_factor)  # + the enabled terms' noisy copies
    return MemoryEstimate(base + adapters, trainable, per_image, images, side, half)


def training_memory(backbone: str, params: dict, half: bool = False, tuning: str = "full") -> float:
    """Bytes one expert's training holds (:func:`estimate_training_memory`'s total)."""
    return estimate_training_memory(backbone, params, tuning, half).total


def _activation_bytes(expert: Expert, side: int, tuning: str, rank: int) -> float:
    """Bytes per image of what autograd keeps for the backward pass in ``tuning`` mode (a storage that
    several operations save counted once; weights, which do not grow with the image, not at all); frozen:
    the largest layer's input and output too, the working set of a forward pass."""
    head = {id(p) for p in expert.baseline_extractor.get_classifier().parameters()}
    for parameter in expert.parameters():
        parameter.requires_grad_(tuning == "full" or id(parameter) in head)
    handles, adapters = [], []
    if tuning in ("lora", "effort"):  # Effort's trained residual is a low-rank path too, on the attention layers
        for layer in (lora_targets(expert) if tuning == "lora" else effort_targets(expert)):
            adapter = (torch.empty(rank, layer.in_features, device="meta", requires_grad=True),
                       torch.empty(layer.out_features, rank, device="meta", requires_grad=True))
            adapters += adapter
            handles.append(layer.register_forward_hook(_adapted(*adapter)))
    working = [0]
    if tuning == "frozen":
        handles += [m.register_forward_hook(_largest_layer(working)) for m in expert.modules() if not list(m.children())]
    weights = {_storage_key(p) for p in [*expert.parameters(), *adapters]}
    saved: dict[int, int] = {}

    def pack(tensor):
        if _storage_key(tensor) not in weights:
            saved[_storage_key(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            expert(torch.zeros(2, 3, side, side, device="meta"))["logits"].sum()
    finally:
        for handle in handles:
            handle.remove()
    return (sum(saved.values()) + working[0]) / 2


def _storage_key(tensor: torch.Tensor) -> int:
    """One storage's identity, on any device (a meta tensor has no data pointer)."""
    return tensor.untyped_storage()._cdata


def _adapted(a: torch.Tensor, b: torch.Tensor):
    """A forward hook adding LoRA's low-rank path ``x A^T B^T`` to a linear layer's output."""
    return lambda module, inputs, output: output + (inputs[0] @ a.t()) @ b.t()


def _largest_layer(working: list[int]):
    """A forward hook keeping in ``working[0]`` the largest input plus output bytes of a layer seen."""
    def hook(module, inputs, output):
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        working[0] = max(working[0], sum(t.numel() * t.element_size() for t in tensors))
    return hook
