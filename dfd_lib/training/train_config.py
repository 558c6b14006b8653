"""Everything that decides an expert's training run: :class:`TrainConfig` (saved beside its
checkpoints). Notebook 04 builds it from its parameters in one call (:meth:`TrainConfig.from_params`:
its own fields plus the flat loss fields of :class:`~dfd_lib.training.losses.LossConfig`: every
registered loss term's weight and options); a YAML / JSON file for ``dfd train`` holds the same
fields with a nested ``loss`` (and ``augment``)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dfd_lib.core.config import StepConfig
from dfd_lib.data.datasets import TrainAugmentConfig
from dfd_lib.training.losses import LossConfig

MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
_NESTED = ("loss", "augment")
# how fast it runs, where it logs and how often it saves its state: not what it computes (a training
# resumed from a step checkpoint ends with the weights of an uninterrupted one)
_SPEED_ONLY = ("progress", "threads", "num_workers", "log_with", "checkpointing_steps", "checkpoints_total_limit")
TUNINGS = ("full", "frozen", "lora", "effort")  # what of the expert trains (dfd_lib.training.tuning)
# settings added after trainings were recorded: part of a training's key only when set, so older keys stay valid
_KEYED_WHEN_SET = {"tuning": "full", "lora_rank": 8, "lora_alpha": 16, "effort_rank": 1}


@dataclass
class TrainConfig(StepConfig):
    """One expert's training run. Defaults are the method's; the profiles set sizes and CPU budgets."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True  # offline weights from a package or weights_path (dfd_lib.models.backbones)
    weights_path: str = ""  # a local weights file for the backbone; empty = packaged or random weights
    image_size: int = 128
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    ema_decay: float = 0.995
    ema_warmup: bool = True  # short runs: let the EMA follow early weights (timm ModelEmaV3 warm-up)
    drop_rate: float = 0.0
    grad_clip: float = 0.0  # clip the gradient norm to this; 0 = no clipping
    grad_accum_steps: int = 1  # one optimiser step per this many micro-batches of batch_size / grad_accum_steps (a smaller card)
    grad_checkpointing: bool = False  # recompute activations in the backward pass (timm): much less memory, slower
    loss: LossConfig = field(default_factory=LossConfig)
    augment: TrainAugmentConfig = field(default_factory=TrainAugmentConfig)
    seed: int = 0
    num_workers: int = 0
    mixed_precision: str = "no"  # "bf16" / "fp16" apply on a GPU only
    channels_last: bool = True
    max_steps_per_epoch: int = 0  # cap on optimiser steps per epoch (CPU budgets, smoke runs); 0 = whole epochs
    freeze_stages: int = 0  # with tuning "full": the first N stage groups of the backbone (stem first) stay frozen (training.freezing)
    # what trains (training.tuning): "full" every weight, "frozen" the head only, "lora" LoRA adapters + head,
    # "effort" the residual singular subspace of the self-attention weights (Effort) + head
    tuning: str = "full"
    lora_rank: int = 8  # with tuning "lora": the adapters' rank r
    lora_alpha: int = 16  # with tuning "lora": the adapters' scale is lora_alpha / lora_rank
    effort_rank: int = 1  # with tuning "effort": the trained residual's rank per weight matrix (the paper's: 1)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int = 0  # torch CPU threads (a busy shared CPU runs faster with fewer); 0 = torch's default
    progress: bool = True
    log_with: str = "tensorboard"  # accelerate tracker(s) for per-step curves, comma-separated (tensorboard, wandb, mlflow, ...); "" = none
    checkpointing_steps: int = 0  # also save the whole state every N optimiser steps (a kill loses < N steps); 0 = at epoch ends only
    checkpoints_total_limit: int = 1  # step checkpoints kept, the newest; an epoch's own state supersedes (removes) them

    def __post_init__(self):
        for name in ("lr", "weight_decay", "warmup_epochs", "min_lr_ratio", "ema_decay", "drop_rate", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, (str, int)) and not isinstance(value, bool):  # YAML reads 1e-3 as a string
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"TrainConfig.{name} must be a number, got {value!r}") from None
        if isinstance(self.loss, Mapping):
            self.loss = LossConfig.from_dict(self.loss)
        if isinstance(self.augment, Mapping):
            self.augment = TrainAugmentConfig(**self.augment)
        for name, ok, requirement in self._checks():
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {requirement}, got {getattr(self, name)!r}")

    def _checks(self) -> list[tuple[str, bool, str]]:
        def count(value, least: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        return [
            ("image_size", count(self.image_size, 8), "an int >= 8"),
            ("epochs", count(self.epochs, 1), "an int >= 1"),
            ("batch_size", count(self.batch_size, 2), "an int >= 2 (the NCE loss needs pairs)"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("ema_decay", 0 < self.ema_decay < 1, "in (0, 1)"),
            ("drop_rate", 0 <= self.drop_rate < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("grad_accum_steps", count(self.grad_accum_steps, 1) and self.batch_size % self.grad_accum_steps == 0
             and self.batch_size // self.grad_accum_steps >= 2, "an int >= 1 that divides batch_size into micro-batches of >= 2"),
            ("num_workers", count(self.num_workers, 0), "an int >= 0"),
            ("mixed_precision", self.mixed_precision in MIXED_PRECISION, f"one of {MIXED_PRECISION}"),
            ("freeze_stages", count(self.freeze_stages, 0), "an int >= 0"),
            ("tuning", self.tuning in TUNINGS, f"one of {TUNINGS}"),
            ("lora_rank", count(self.lora_rank, 1), "an int >= 1"),
            ("lora_alpha", count(self.lora_alpha, 1), "an int >= 1"),
            ("effort_rank", count(self.effort_rank, 1), "an int >= 1"),
            ("max_steps_per_epoch", count(self.max_steps_per_epoch, 0), "an int >= 0 (0 = whole epochs)"),
            ("device", self.device in DEVICES, f"one of {DEVICES}"),
            ("threads", count(self.threads, 0), "an int >= 0 (0 = torch's default)"),
            ("checkpointing_steps", count(self.checkpointing_steps, 0), "an int >= 0 (0 = at epoch ends only)"),
            ("checkpoints_total_limit", count(self.checkpoints_total_limit, 1), "an int >= 1"),
            ("loss", isinstance(self.loss, LossConfig), "a LossConfig (or a dict of its fields)"),
            ("augment", isinstance(self.augment, TrainAugmentConfig), "a TrainAugmentConfig (or a dict of its fields)"),
        ]

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        own = tuple(f.name for f in dataclasses.fields(cls) if f.name not in _NESTED)
        clashing = sorted(set(own) & set(LossConfig.parameter_names()))
        if clashing:  # one flat namespace (a notebook's) feeds both
            raise ValueError(f"loss term parameter(s) {clashing} clash with TrainConfig's own fields")
        return own + LossConfig.parameter_names()

    @classmethod
    def parameter_defaults(cls) -> dict[str, Any]:
        return {**super().parameter_defaults(), **LossConfig.parameter_defaults()}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainConfig:
        """The config from flat parameters (a notebook's): its own fields and the loss fields by name."""
        cls.parameter_names()  # refuses a loss parameter named like a field of ours
        own = {f.name for f in dataclasses.fields(cls) if f.name not in _NESTED}
        return cls(**{name: params[name] for name in own if name in params}, loss=LossConfig.from_params(params))

    def to_dict(self) -> dict[str, Any]:
        """The config as saved beside a training (``train_config.json``), the loss as :meth:`LossConfig.to_dict`."""
        saved = dataclasses.asdict(self)  # copies the LossConfig object as it is (not a dataclass) ...
        saved["loss"] = self.loss.to_dict()  # ... replaced in its field's place: the key order of the file stays
        return saved

    def result_settings(self) -> dict:
        """The settings that decide what a training computes: how fast it runs and where it logs left out."""
        return _result_only(self.to_dict())

    def same_run_as(self, other: Mapping) -> bool:
        """Whether a saved config describes the same run (how fast it ran aside)."""
        return self.result_settings() == _result_only(other)


def _result_only(settings: Mapping) -> dict:
    """``settings`` without the speed-only ones, and without the later ones at their defaults (a config saved
    before they existed and one saved with them unset describe the same run)."""
    settings = json.loads(json.dumps(dict(settings)))
    for key in _SPEED_ONLY:
        settings.pop(key, None)
    for key, default in _KEYED_WHEN_SET.items():
        if settings.get(key, default) == default:
            settings.pop(key, None)
    return settings
