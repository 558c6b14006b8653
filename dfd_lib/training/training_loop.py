"""One expert's training, built: the expert (its tuning, frozen stages and optional localisation head), its
data loaders, AdamW (timm's parameter groups), the warm-up + cosine schedule per optimiser step, the EMA and the
loss terms, all prepared by ``accelerate`` (:func:`build_loop`); :class:`TrainingLoop` holds what the steps of
:mod:`dfd_lib.training.trainer` share.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import LambdaLR

from dfd_lib.data.datasets import ManifestDataset, make_loader
from dfd_lib.models.backbones import expert_input
from dfd_lib.models.experts import Expert, create_ema
from dfd_lib.training.freezing import freeze_backbone_stages
from dfd_lib.training.losses import MultiLoss
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.training_log import trackers
from dfd_lib.training.tuning import apply_tuning

log = logging.getLogger(__name__)


@dataclass
class TrainingLoop:
    """What every piece of one expert's training shares."""

    config: TrainConfig
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any  # accelerate's wrapper of the torch optimiser
    scheduler: LambdaLR
    ema: Any  # timm ModelEmaV3
    loss_fn: MultiLoss
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    frozen: list
    inputs: dict  # the expert's preprocessing: image_size, mean, std, interpolation (models.backbones.expert_input)
    name: str  # the run folder's name, for messages
    selection: str  # "val_auc" or "val_loss"
    weights_source: str  # where the backbone's starting weights came from
    on_step: Callable[[int, int, int], None] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    curves: list[dict] = field(default_factory=list)  # one row per optimiser step (main process)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    @property
    def show(self) -> bool:
        return self.config.progress and self.accelerator.is_local_main_process


def build_loop(train_table: pd.DataFrame, val_table: pd.DataFrame, config: TrainConfig, out_dir: Path,
                on_step: Callable | None) -> TrainingLoop:
    """Seed, build the expert, its data, optimiser, schedule, EMA and losses, prepared by accelerate."""
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = accelerator_for(config, out_dir)
    set_seed(config.seed)
    weights = config.weights_path or None
    head = config.loss.mask_head if learns_masks(config) else None  # the mask term trains a localisation head
    model = Expert(config.backbone, pretrained=config.pretrained, weights_path=weights, drop_rate=config.drop_rate,
                   localisation_head=head)
    # what trains: with tuning "full" all but the first freeze_stages stage groups; the other tunings freeze the backbone
    frozen = (freeze_backbone_stages(model, config.freeze_stages) if config.tuning == "full"
              else apply_tuning(model, config.tuning, config.lora_rank, config.lora_alpha, config.effort_rank))
    if config.grad_checkpointing:
        model.baseline_extractor.set_grad_checkpointing(True)  # timm: recompute activations in the backward pass
    inputs = expert_input(model.baseline_extractor, config.image_size)  # a ViT keeps its own size, the rest image_size
    size, mean, std, interpolation = inputs["image_size"], tuple(inputs["mean"]), tuple(inputs["std"]), inputs["interpolation"]
    model = model.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    batch_size = min(config.batch_size, len(train_table))
    micro_batch = max(1, batch_size // config.grad_accum_steps)  # the effective batch stays batch_size
    train_set = ManifestDataset(train_table, size, train=True, mean=mean, std=std, augment=config.augment,
                                interpolation=interpolation, seed=config.seed, masks=head is not None)
    val_set = ManifestDataset(val_table, size, train=False, mean=mean, std=std, interpolation=interpolation)
    train_loader = make_loader(train_set, micro_batch, shuffle=True, seed=config.seed, num_workers=config.num_workers, drop_last=True)
    val_loader = make_loader(val_set, batch_size * 2, shuffle=False, num_workers=config.num_workers)
    # timm's AdamW groups: no weight decay on biases and norm weights; frozen parameters left out
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps = len(train_loader) // config.grad_accum_steps  # optimiser steps
    steps = min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps
    # stepped once per optimiser step, so it is registered for checkpointing rather than prepared
    # (accelerate's wrapper would step it once per process)
    inner = getattr(optimizer, "optimizer", optimizer)
    scheduler = LambdaLR(inner, warmup_cosine(round(config.warmup_epochs * steps), steps * config.epochs, config.min_lr_ratio))
    ema = create_ema(accelerator.unwrap_model(model), config.ema_decay, use_warmup=config.ema_warmup)
    accelerator.register_for_checkpointing(ema, scheduler)
    selection = "val_loss" if val_table["label"].nunique() < 2 else "val_auc"
    if selection == "val_loss":
        log.warning("the validation set holds one class only: AUC is undefined, the best epoch is chosen by validation loss")
    return TrainingLoop(config, accelerator, model, optimizer, scheduler, ema, MultiLoss(config.loss), train_loader, val_loader,
                 steps, frozen, inputs, out_dir.name, selection, accelerator.unwrap_model(model).weights_source, on_step)


def learns_masks(config: TrainConfig) -> bool:
    """Whether the ``mask`` loss term is on: the expert gets a localisation head and the rows their masks."""
    return config.loss.weights.get("mask", 0.0) > 0


def accelerator_for(config: TrainConfig, out_dir: Path):
    use_gpu = config.device != "cpu" and torch.cuda.is_available()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device is 'cuda' but no GPU is visible")
    precision = config.mixed_precision
    if precision != "no" and not use_gpu:
        log.warning("mixed_precision=%r applies on a GPU only; training in float32 on the CPU", precision)
        precision = "no"
    # rng_types=[]: the data order comes from (seed, epoch), nothing to synchronise
    chosen = trackers(config)
    return Accelerator(cpu=not use_gpu, mixed_precision=precision, rng_types=[], log_with=chosen or None,
                       project_dir=str(out_dir) if chosen else None)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
