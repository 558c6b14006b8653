"""Training one expert per re-split, and assembling the experts into a mixture.

One loop serves every size: AdamW, linear warm-up then cosine decay per step, the weighted
CE / NCE / KL losses (:mod:`dfd_lib.losses`), an EMA of the weights validated every epoch,
the best epoch kept by validation AUC. ``accelerate`` runs it on one CPU process, one GPU
(with bf16/fp16 autocast) or several (``accelerate launch -m dfd_lib.train --config ...``)
without code changes.

Resume: after every epoch the whole training state (model, EMA, optimiser, schedule, scaler,
RNG states, counters, history) is written to ``last.safetensors`` atomically. A killed run
started again with the same arguments continues after the last finished epoch and ends with
the same weights as an uninterrupted run: the data order and the augmentation of each epoch
derive from ``(seed, epoch)``, and the RNG states (noise of the KL term, dropout) are restored.

Files in ``out_dir``: ``last.safetensors`` (training state), ``best_ema.safetensors`` (EMA
weights of the best epoch, with its metadata), ``history.csv``, ``train_config.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from dfd_lib.atomic import atomic_write
from dfd_lib.checkpoint import MixtureConfig, save_mixture
from dfd_lib.datasets import AugmentConfig, ManifestDataset, make_loader
from dfd_lib.evaluate import binary_metrics
from dfd_lib.losses import LOSS_NAMES, LossConfig, MultiLoss
from dfd_lib.models import Expert, MixtureOfExperts, create_ema

LAST_CHECKPOINT = "last.safetensors"
BEST_WEIGHTS = "best_ema.safetensors"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "train_config.json"
MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
RESPLIT_PREFIX = "resplit_"


@dataclass
class TrainConfig:
    """Everything that decides an expert's training run (saved beside its checkpoints)."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True  # offline weights from a package or weights_path (dfd_lib.backbones)
    weights_path: str | None = None
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
    grad_clip: float | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    num_workers: int = 0
    mixed_precision: str = "no"  # "bf16" / "fp16" apply on a GPU only
    channels_last: bool = True
    max_steps_per_epoch: int | None = None  # smoke runs
    freeze_stages: int = 0  # the first N stage groups of the backbone (stem first) stay frozen: see freeze_backbone_stages
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # torch CPU threads (a busy shared CPU runs faster with fewer)
    progress: bool = True

    def __post_init__(self):
        for name in ("lr", "weight_decay", "warmup_epochs", "min_lr_ratio", "ema_decay", "drop_rate", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, (str, int)) and not isinstance(value, bool):  # YAML reads 1e-3 as a string
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"TrainConfig.{name} must be a number, got {value!r}") from None
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        checks = [
            ("image_size", isinstance(self.image_size, int) and self.image_size >= 8, "an int >= 8"),
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "an int >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 2, "an int >= 2 (the NCE loss needs pairs)"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("ema_decay", 0 < self.ema_decay < 1, "in (0, 1)"),
            ("drop_rate", 0 <= self.drop_rate < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "None or > 0"),
            ("num_workers", isinstance(self.num_workers, int) and self.num_workers >= 0, "an int >= 0"),
            ("mixed_precision", self.mixed_precision in MIXED_PRECISION, f"one of {MIXED_PRECISION}"),
            ("freeze_stages", isinstance(self.freeze_stages, int) and not isinstance(self.freeze_stages, bool) and self.freeze_stages >= 0, "an int >= 0"),
            ("max_steps_per_epoch", self.max_steps_per_epoch is None or (isinstance(self.max_steps_per_epoch, int) and self.max_steps_per_epoch >= 1), "None or an int >= 1"),
            ("device", self.device in DEVICES, f"one of {DEVICES}"),
            ("threads", self.threads is None or (isinstance(self.threads, int) and self.threads >= 1), "None or an int >= 1"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {requirement}, got {getattr(self, name)!r}")
        if not isinstance(self.loss, LossConfig) or not isinstance(self.augment, AugmentConfig):
            raise ValueError("TrainConfig.loss must be a LossConfig (or dict) and augment an AugmentConfig (or dict)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def same_run_as(self, other: dict) -> bool:
        """Whether a saved config describes the same run (progress display aside)."""
        mine, theirs = self.to_dict(), json.loads(json.dumps(other))
        for d in (mine, theirs):
            for key in ("progress", "threads", "num_workers"):  # how fast, not what is computed
                d.pop(key, None)
        return json.loads(json.dumps(mine)) == theirs


@dataclass
class TrainResult:
    """The outcome of :func:`train_expert`."""

    out_dir: Path
    best_weights: Path  # EMA weights of the best epoch (safetensors, Expert state dict)
    best_epoch: int  # 0-based
    best_val_auc: float
    selection: str  # "val_auc", or "val_loss" when the validation set has one class only
    history: pd.DataFrame  # one row per epoch: lr, train_<loss> means, val metrics, throughput
    config: TrainConfig
    skipped: pd.DataFrame  # unreadable images (path, reason), never fatal
    seconds: float = math.nan  # wall time of the call: training, validation and checkpoints


# --------------------------------------------------------------------------- state files


def _flatten(obj, path: str, tensors: dict[str, torch.Tensor]):
    """A JSON skeleton of ``obj`` with every tensor / array moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iu" else obj.dtype))
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):  # keys kept with their type (optimizer state keys are ints)
        return {"__dict__": [[k, _flatten(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy().astype(skeleton["dtype"])
        if "__tuple__" in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    return skeleton


def save_state_file(path: str | os.PathLike, state: dict) -> Path:
    """Write a nested dict of tensors, arrays and JSON values as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    metadata = {"format": "pt", "dfd_state": json.dumps(skeleton)}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_state_file(path: str | os.PathLike) -> dict:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        skeleton = json.loads(handle.metadata()["dfd_state"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return _unflatten(skeleton, tensors)


def _rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(tuple(states["numpy"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def load_expert(weights_path: str | os.PathLike) -> tuple[Expert, dict]:
    """An expert from ``best_ema.safetensors`` and the metadata stored with it."""
    with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
        meta = json.loads(handle.metadata()["dfd_expert"])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    expert = Expert(meta["backbone"], pretrained=False)
    expert.load_state_dict(state, strict=True)
    return expert.eval(), meta


# --------------------------------------------------------------------------- freezing


def backbone_stage_groups(expert: Expert) -> list[list[str]]:
    """The backbone's parameter names in timm's coarse stage groups, input side first: the
    stem, one group per stage, the head last (``group_matcher(coarse=True)``)."""
    from timm.models import group_parameters

    net = expert.baseline_extractor
    groups = group_parameters(net, net.group_matcher(coarse=True))
    return [groups[key] for key in sorted(groups)]


def freeze_backbone_stages(expert: Expert, n_stages: int) -> list[torch.nn.Module]:
    """Freeze the first ``n_stages`` stage groups of ``expert`` (:func:`backbone_stage_groups`):
    no gradients, and their BatchNorm statistics fixed. Returns the modules that must stay in
    eval mode while the rest trains (pass them to ``model.train()`` callers).

    Fine-tuning only the last stages of a pretrained backbone is far cheaper on a CPU: the
    backward pass stops where the trainable part begins, and the early stages run at the
    highest resolution."""
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
    # a module is frozen when it has parameters and all of them are: eval() keeps its BatchNorm
    # statistics (and any dropout or drop-path inside it) fixed while the rest trains
    frozen = []
    for name, module in expert.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) and not any(name.startswith(f"{outer}.") for outer in frozen):
            frozen.append(name)
    return [expert.get_submodule(name) for name in frozen]


def _train_mode(model: torch.nn.Module, frozen: Sequence[torch.nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()


# --------------------------------------------------------------------------- the loop


def _warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    use_gpu = config.device != "cpu" and torch.cuda.is_available()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device is 'cuda' but no GPU is visible")
    precision = config.mixed_precision
    if precision != "no" and not use_gpu:
        warnings.warn(f"mixed_precision={precision!r} applies on a GPU only; training in float32 on the CPU", stacklevel=3)
        precision = "no"
    # rng_types=[]: the data order comes from (seed, epoch), nothing to synchronise
    return Accelerator(cpu=not use_gpu, mixed_precision=precision, rng_types=[])


@torch.no_grad()
def _predict(model, loader, accelerator, memory_format) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Labels, fake-probabilities and cross-entropies of every readable sample, gathered."""
    model.eval()
    labels, probs, losses, skipped = [], [], [], []
    for batch in loader:
        skipped.extend(batch["skipped"])
        images = batch["image"]
        if images.numel() == 0:
            continue
        with accelerator.autocast():
            logits = model(images.contiguous(memory_format=memory_format))["logits"].float()
        ce = torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")
        y, p, c = accelerator.gather_for_metrics((batch["label"], logits.softmax(-1)[:, 1], ce))
        labels.append(y.cpu())
        probs.append(p.cpu())
        losses.append(c.cpu())
    if not labels:
        return np.zeros(0, int), np.zeros(0), np.zeros(0), skipped
    return torch.cat(labels).numpy(), torch.cat(probs).numpy(), torch.cat(losses).numpy(), skipped


def _match_strides(optimizer: torch.optim.Optimizer) -> None:
    # loaded optimiser state is contiguous; give it its parameter's layout (channels_last)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def train_expert(
    train_table: pd.DataFrame,
    val_table: pd.DataFrame,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    on_step: Callable[[int, int, int], None] | None = None,
) -> TrainResult:
    """Train one expert on ``train_table``, validating its EMA weights on ``val_table`` each
    epoch. With ``resume`` and a ``last.safetensors`` in ``out_dir`` from the same config,
    the run continues after its last finished epoch. ``on_step(epoch, step_in_epoch,
    global_step)`` is called after every optimiser step (progress hooks, tests)."""
    out_dir = Path(out_dir)
    if len(train_table) < 2 or len(val_table) < 1:
        raise ValueError(f"need >= 2 training and >= 1 validation rows, got {len(train_table)} and {len(val_table)}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    accelerator = _accelerator(config)
    from accelerate.utils import set_seed

    set_seed(config.seed)
    started_at = time.perf_counter()
    model = Expert(config.backbone, pretrained=config.pretrained, weights_path=config.weights_path, drop_rate=config.drop_rate)
    frozen = freeze_backbone_stages(model, config.freeze_stages)
    from timm.data import resolve_model_data_config

    data_config = resolve_model_data_config(model.baseline_extractor)
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    batch_size = min(config.batch_size, len(train_table))
    train_set = ManifestDataset(train_table, config.image_size, train=True, mean=mean, std=std, augment=config.augment, seed=config.seed)
    val_set = ManifestDataset(val_table, config.image_size, train=False, mean=mean, std=std)
    train_loader = make_loader(train_set, batch_size, shuffle=True, seed=config.seed, num_workers=config.num_workers, drop_last=True)
    val_loader = make_loader(val_set, batch_size * 2, shuffle=False, num_workers=config.num_workers)

    from timm.optim import create_optimizer_v2

    # timm's AdamW groups: no weight decay on biases and norm weights; frozen parameters left out
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimiser under accelerate's wrapper
    steps_per_epoch = len(train_loader) if config.max_steps_per_epoch is None else min(len(train_loader), config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    scheduler = LambdaLR(inner_optimizer, _warmup_cosine(round(config.warmup_epochs * steps_per_epoch), total_steps, config.min_lr_ratio))
    ema = create_ema(accelerator.unwrap_model(model), config.ema_decay, use_warmup=config.ema_warmup)
    loss_fn = MultiLoss(config.loss)
    single_class = val_table["label"].nunique() < 2
    selection = "val_loss" if single_class else "val_auc"
    if single_class:
        warnings.warn("the validation set holds one class only: AUC is undefined, the best epoch is chosen by validation loss", stacklevel=2)

    start_epoch, global_step, best_epoch, best_score, history = 0, 0, -1, -math.inf, []
    last_path = out_dir / LAST_CHECKPOINT
    if resume and last_path.is_file():
        state = load_state_file(last_path)
        if not config.same_run_as(state["config"]):
            raise ValueError(f"{last_path} was written by a run with a different config; use another out_dir or resume=False")
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        inner_optimizer.load_state_dict(state["optimizer"])
        _match_strides(inner_optimizer)
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        _set_rng_states(state["rng"][accelerator.process_index] if accelerator.process_index < len(state["rng"]) else state["rng"][0])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        best_epoch, best_score, history = state["best_epoch"], state["best_score"], state["history"]
        if accelerator.is_main_process:
            tqdm.write(f"resuming {out_dir.name} after epoch {start_epoch} of {config.epochs}")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n"))

    skipped: dict[str, str] = {}
    show = config.progress and accelerator.is_local_main_process
    for epoch in range(start_epoch, config.epochs):
        train_loader.set_epoch(epoch)  # the order and augmentation of this epoch: from (seed, epoch)
        train_set.set_epoch(epoch)
        epoch_lr = inner_optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        seen, sums, data_seconds, global_step = _train_epoch(
            accelerator, model, optimizer, scheduler, ema, loss_fn, train_loader, steps_per_epoch, memory_format,
            epoch, global_step, config, show, out_dir.name, skipped, on_step, frozen,
        )
        train_seconds = time.perf_counter() - started
        totals = accelerator.reduce(torch.tensor([seen, *sums.values()], dtype=torch.float64, device=accelerator.device), "sum")
        seen_all = max(1.0, float(totals[0]))
        y, p, ce, val_skipped = _predict(ema.module, val_loader, accelerator, memory_format)
        for path, reason in val_skipped:
            skipped[path] = reason
        metrics = binary_metrics(y, p) if len(y) else {"auc": math.nan, "ap": math.nan, "eer": math.nan, "acc_at_0.5": math.nan}
        val_loss = float(ce.mean()) if len(ce) else math.nan
        row = {
            "epoch": epoch,
            "lr": epoch_lr,  # at the epoch's first step
            **{f"train_{name}": float(totals[i + 1]) / seen_all for i, name in enumerate(sums)},
            "val_auc": metrics["auc"], "val_ap": metrics["ap"], "val_eer": metrics["eer"],
            "val_acc": metrics["acc_at_0.5"], "val_loss": val_loss,
            "train_images": int(totals[0]), "train_seconds": train_seconds,
            "images_per_s": float(totals[0]) / train_seconds,  # all processes together
            "data_share": data_seconds / train_seconds if train_seconds > 0 else math.nan,
        }
        history.append(row)
        score = -val_loss if selection == "val_loss" else metrics["auc"]
        # the first epoch is always kept, so a run whose validation fails still yields weights
        improved = best_epoch < 0 or (score == score and score > best_score)
        if improved:
            best_epoch, best_score = epoch, float(score) if score == score else -math.inf
        if accelerator.is_main_process:
            if improved:
                _save_best(out_dir / BEST_WEIGHTS, ema.module, config, mean, std, epoch, row)
            atomic_write(out_dir / HISTORY_FILE, lambda tmp: pd.DataFrame(history).to_csv(tmp, index=False))
        _save_last(last_path, accelerator, model, ema, inner_optimizer, scheduler, config, epoch, global_step, best_epoch, best_score, history)
        if show:
            tqdm.write(
                f"{out_dir.name} epoch {epoch + 1}/{config.epochs}: loss {row['train_overall']:.4f} "
                + " ".join(f"{name} {row[f'train_{name}']:.4f}" for name in LOSS_NAMES if config.loss.weights[name] > 0)
                + f" | val AUC {row['val_auc']:.4f} loss {val_loss:.4f} | {row['images_per_s']:.1f} img/s"
                + (" *best*" if improved else "")
            )
    accelerator.wait_for_everyone()
    history_frame = pd.DataFrame(history)
    best_auc = float(history_frame.loc[history_frame["epoch"] == best_epoch, "val_auc"].iloc[0]) if best_epoch >= 0 else math.nan
    return TrainResult(
        out_dir=out_dir, best_weights=out_dir / BEST_WEIGHTS, best_epoch=best_epoch, best_val_auc=best_auc,
        selection=selection, history=history_frame, config=config,
        skipped=pd.DataFrame(sorted(skipped.items()), columns=["path", "reason"]),
        seconds=time.perf_counter() - started_at,
    )


def _train_epoch(accelerator, model, optimizer, scheduler, ema, loss_fn, loader, steps, memory_format, epoch, global_step,
                 config, show, name, skipped, on_step, frozen=()):
    """One epoch of optimiser steps; returns (images seen, loss sums, seconds waiting for data, global step)."""
    _train_mode(model, frozen)
    sums = {loss: 0.0 for loss in ("overall", *LOSS_NAMES)}
    seen, data_seconds = 0, 0.0
    bar = tqdm(total=steps, desc=f"{name} epoch {epoch + 1}/{config.epochs}", disable=not show, leave=False)
    batches = iter(loader)
    for step in range(steps):
        waited = time.perf_counter()
        batch = next(batches)
        data_seconds += time.perf_counter() - waited
        for path, reason in batch["skipped"]:
            if path not in skipped and show:
                tqdm.write(f"skipped unreadable image {path}: {reason}")
            skipped[path] = reason
        images, labels = batch["image"], batch["label"]
        # A batch left with < 2 readable images teaches nothing (and breaks BatchNorm). Under
        # several processes a skipped step would desynchronise them; unreadable files are rare.
        if images.shape[0] < 2:
            continue
        losses = loss_fn(model, images.contiguous(memory_format=memory_format), labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(losses["overall"])
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        global_step += 1
        ema.update(accelerator.unwrap_model(model), step=global_step)
        seen += images.shape[0]
        for loss in sums:
            sums[loss] += float(losses[loss].detach()) * images.shape[0]
        bar.update(1)
        bar.set_postfix({loss: f"{value / seen:.3f}" for loss, value in sums.items()})
        if on_step is not None:
            on_step(epoch, step, global_step)
    bar.close()
    batches.close()  # we stop after `steps`: let accelerate forget this iteration
    if hasattr(loader, "end"):
        loader.end()
    return seen, sums, data_seconds, global_step


def _save_best(path: Path, ema_module, config: TrainConfig, mean, std, epoch: int, row: dict) -> None:
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in ema_module.state_dict().items()}
    meta = {"backbone": ema_module.backbone_name, "image_size": config.image_size, "mean": list(mean), "std": list(std),
            "epoch": epoch, "val_auc": row["val_auc"], "val_loss": row["val_loss"]}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "dfd_expert": json.dumps(meta)}))


def _save_last(path, accelerator, model, ema, optimizer, scheduler, config, epoch, global_step, best_epoch, best_score, history):
    from accelerate.utils import gather_object

    rng = gather_object([_rng_states()]) if accelerator.num_processes > 1 else [_rng_states()]
    if not accelerator.is_main_process:
        return
    state = {
        "model": accelerator.unwrap_model(model).state_dict(),
        "ema": ema.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": rng,  # one entry per process
        "epoch": epoch, "global_step": global_step, "best_epoch": best_epoch,
        "best_score": best_score if math.isfinite(best_score) else -1e300,
        "history": history, "config": config.to_dict(),
    }
    save_state_file(path, state)


# --------------------------------------------------------------------------- the mixture


@dataclass
class MixtureTrainResult:
    directory: Path  # the mixture in our weights format (dfd_lib.checkpoint)
    experts: list[TrainResult]
    summary: pd.DataFrame  # one row per expert: resplit, backbone, best epoch, best val AUC
    seconds: float = math.nan  # wall time of all the experts' training


def resplit_indices(table: pd.DataFrame) -> list[int]:
    return sorted(int(c[len(RESPLIT_PREFIX):]) for c in table.columns if c.startswith(RESPLIT_PREFIX) and c[len(RESPLIT_PREFIX):].isdigit())


def mixture_from_experts(weights_paths: Sequence[str | os.PathLike], provenance: dict | None = None) -> tuple[MixtureOfExperts, MixtureConfig]:
    """The experts' best EMA weights as one mixture and its config (our checkpoint format)."""
    experts, metas = zip(*(load_expert(path) for path in weights_paths))
    first = metas[0]
    for meta in metas[1:]:
        if (meta["image_size"], meta["mean"], meta["std"]) != (first["image_size"], first["mean"], first["std"]):
            raise ValueError("the experts differ in image size or normalisation; a mixture shares one preprocessing")
    config = MixtureConfig(
        backbones=[e.backbone_name for e in experts], image_size=first["image_size"], mean=first["mean"], std=first["std"],
        interpolation="bilinear", antialias=True, preprocess="default", ema_folded=True, provenance=provenance or {},
    )
    return MixtureOfExperts(list(experts)), config


def train_mixture(
    table: pd.DataFrame,
    config: TrainConfig | Sequence[TrainConfig],
    out_dir: str | os.PathLike,
    resplits: Sequence[int] | None = None,
    resume: bool = True,
    mixture_dir: str | os.PathLike | None = None,
) -> MixtureTrainResult:
    """One expert per re-split (train on rows whose ``resplit_<i>`` is ``train``, validate on
    ``val``), then their best EMA weights saved as a mixture in ``mixture_dir`` (default
    ``out_dir/mixture``). ``config`` is shared or one per re-split (the backbone may differ
    per expert)."""
    available = resplit_indices(table)
    chosen = list(available if resplits is None else resplits)
    missing = sorted(set(chosen) - set(available))
    if missing or not chosen:
        raise ValueError(f"re-splits {missing or chosen} not in the table (it has resplit_ columns for {available})")
    configs = [config] * len(chosen) if isinstance(config, TrainConfig) else list(config)
    if len(configs) != len(chosen):
        raise ValueError(f"{len(configs)} configs for {len(chosen)} re-splits")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    results = []
    for i, cfg in zip(chosen, configs):
        column = table[f"{RESPLIT_PREFIX}{i}"]
        results.append(train_expert(table[column == "train"], table[column == "val"], cfg, out_dir / f"expert_{i}", resume=resume))
    summary = pd.DataFrame([
        {"resplit": i, "backbone": r.config.backbone, "best_epoch": r.best_epoch, "best_val_auc": r.best_val_auc,
         "selection": r.selection, "images_per_s": float(r.history["images_per_s"].mean()), "seconds": r.seconds}
        for i, r in zip(chosen, results)
    ])
    provenance = {"trained_by": "dfd_lib.train.train_mixture", "resplits": ",".join(map(str, chosen)),
                  "best_val_auc": ",".join(f"{r.best_val_auc:.4f}" for r in results)}
    directory = Path(mixture_dir) if mixture_dir is not None else out_dir / "mixture"
    model, mixture_config = mixture_from_experts([r.best_weights for r in results], provenance)
    from accelerate import PartialState

    if PartialState().is_main_process:
        save_mixture(model, directory, mixture_config)
    return MixtureTrainResult(directory=directory, experts=results, summary=summary, seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------- entry point


def _read_config_file(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dfd_lib.train`` / ``accelerate launch -m dfd_lib.train``."""
    parser = argparse.ArgumentParser(prog="python -m dfd_lib.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML/JSON with TrainConfig fields (nested 'loss' and 'augment')")
    parser.add_argument("--table", type=Path, help="re-split CSV (dfd_lib.split): trains one expert per resplit_<i> and the mixture")
    parser.add_argument("--resplits", type=int, nargs="*", help="which re-splits (default: all)")
    parser.add_argument("--train-table", type=Path, help="manifest CSV to train one expert on")
    parser.add_argument("--val-table", type=Path, help="manifest CSV to validate it on")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--no-resume", action="store_true", help="start over even if out-dir holds a checkpoint")
    args = parser.parse_args(argv)
    from dfd_lib.manifest import Manifest

    try:
        config = TrainConfig.from_dict(_read_config_file(args.config) if args.config else {})
        if args.table is not None:
            from dfd_lib.split import load_resplits

            result = train_mixture(load_resplits(args.table), config, args.out_dir, args.resplits, resume=not args.no_resume)
            print(result.summary.to_string(index=False))
            print(f"mixture written to {result.directory}")
        elif args.train_table is not None and args.val_table is not None:
            expert = train_expert(Manifest.load(args.train_table).table, Manifest.load(args.val_table).table, config,
                                  args.out_dir, resume=not args.no_resume)
            print(f"best epoch {expert.best_epoch + 1}: val AUC {expert.best_val_auc:.4f}; weights {expert.best_weights}")
        else:
            parser.error("give --table, or --train-table and --val-table")
    except (ValueError, FileNotFoundError) as exc:
        print(f"dfd_lib.train: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
