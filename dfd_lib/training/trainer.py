"""Training one expert: the loop over epochs and steps, its checkpoints and resume (what it runs is built by
:mod:`dfd_lib.training.training_loop`).

AdamW (timm's parameter groups), linear warm-up then cosine decay per step, the weighted loss terms
(CE / NCE / KL and any other registered in :mod:`dfd_lib.training.loss_terms`, summed by
:class:`~dfd_lib.training.losses.MultiLoss`), an EMA of the weights validated every epoch, the best
epoch kept by validation AUC. ``accelerate`` runs it on one CPU process, one GPU (with bf16/fp16
autocast) or several (``accelerate launch -m dfd_lib.training.cli ...``) without code changes.

Resume: after every epoch, and with ``TrainConfig.checkpointing_steps`` every N optimiser steps within
one, the whole training state is saved with accelerate's ``save_state``
(:mod:`dfd_lib.training.training_state`). A killed run started again with the same arguments
continues from its newest state — after the last finished epoch, or at the exact step of a step
checkpoint, the batches already done skipped unread — and ends with the same weights as an
uninterrupted run: the data order and the augmentation of each epoch derive from ``(seed, epoch)``,
and the RNG states (noise of the KL term, dropout) are restored. A state is resumed (or a finished training reused) only
when its key — the training and validation rows' content, the settings, the starting weights — is the
key of the training asked for (:mod:`dfd_lib.training.training_key`).

Curves: every optimiser step's total loss, each loss part and the learning rate (the main process's
batches), and every epoch's validation metrics, go to accelerate's trackers (``TrainConfig.log_with``,
TensorBoard by default: ``tensorboard --logdir reports/<run>/experts``) and to ``curves.csv``, which
the kit's own figures read (:mod:`dfd_lib.training.curves`); see :mod:`dfd_lib.training.training_log`.

Files in ``out_dir``: ``state/`` (training state), ``step_states/`` (step checkpoints of an unfinished
epoch), ``best_ema.safetensors`` (EMA weights of the best epoch, with its metadata), ``history.csv`` (one
row per epoch), ``curves.csv`` (one row per step), ``tensorboard/`` (the tracker's files),
``train_config.json``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.faults import crash_point
from dfd_lib.core.logs import progress_bar
from dfd_lib.models.checkpoints import save_expert_weights
from dfd_lib.stats.metrics import binary_metrics
from dfd_lib.training.epoch_resume import EpochTotals, epoch_batches, epoch_totals, saved_totals, summed
from dfd_lib.training.freezing import train_mode
from dfd_lib.training.losses import loss_names
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.training_key import key_changes, training_key
from dfd_lib.training.training_log import CURVES_FILE, TRACKER_PROJECT, log_epoch, log_step, read_curves, tracker_config
from dfd_lib.training.training_loop import TrainingLoop, build_loop
from dfd_lib.training.training_state import (
    Progress,
    discard_training,
    find_latest_state,
    load_training_state,
    read_progress,
    remove_step_states,
    save_step_state,
    save_training_state,
)
from dfd_lib.training.tuning import merged_expert

BEST_WEIGHTS = "best_ema.safetensors"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "train_config.json"
OUTPUTS = (BEST_WEIGHTS, HISTORY_FILE, CURVES_FILE, CONFIG_FILE, TRACKER_PROJECT)  # what a training writes beside its state
log = logging.getLogger(__name__)


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
    weights_source: str = ""  # where the backbone's starting weights came from when it started (models.backbones)
    key: dict = field(default_factory=dict)  # what it was made from (training_key): rows, settings, weights


def train_expert(
    train_table: pd.DataFrame,
    val_table: pd.DataFrame,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    on_step: Callable[[int, int, int], None] | None = None,
) -> TrainResult:
    """Train one expert on ``train_table``, validating its EMA weights on ``val_table`` each
    epoch. With ``resume`` and a saved state in ``out_dir`` made from the same rows, settings and starting
    weights (:mod:`dfd_lib.training.training_key`; anything else is removed and trained again), the run
    continues after its last finished epoch. ``on_step(epoch, step_in_epoch, global_step)`` is
    called after every optimiser step (progress hooks, tests)."""
    out_dir = Path(out_dir)
    if len(train_table) < 2 or len(val_table) < 1:
        raise ValueError(f"need >= 2 training and >= 1 validation rows, got {len(train_table)} and {len(val_table)}")
    started = time.perf_counter()
    loop = build_loop(train_table, val_table, config, out_dir, on_step)
    key = training_key(train_table, val_table, config, loop.weights_source)
    if not resume and loop.accelerator.is_main_process:
        discard_training(out_dir, OUTPUTS)
    progress = _resume(loop, out_dir, key) if resume else _fresh(loop, key)
    if loop.accelerator.log_with:  # after a discarded training's logs are gone
        loop.accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(config))
    progress.config = config.to_dict()
    loop.curves = read_curves(out_dir, progress.global_step) if progress.global_step else []
    if loop.accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n"))
    try:
        for epoch in range(progress.epoch + 1, config.epochs):
            row = _run_epoch(loop, epoch, progress, out_dir)
            progress.global_step = row.pop("global_step")
            improved = progress.record(row, -row["val_loss"] if loop.selection == "val_loss" else row["val_auc"])
            log_epoch(loop.accelerator, row, progress.global_step)
            if loop.accelerator.is_main_process:
                if improved:
                    # LoRA's adapters merged into the weights: a plain timm expert (training.tuning)
                    save_expert_weights(out_dir / BEST_WEIGHTS, merged_expert(loop.ema.module), _best_meta(loop, row))
                atomic_write(out_dir / HISTORY_FILE, lambda tmp: pd.DataFrame(progress.history).to_csv(tmp, index=False))
                atomic_write(out_dir / CURVES_FILE, lambda tmp: pd.DataFrame(loop.curves).to_csv(tmp, index=False))
            save_training_state(loop.accelerator, out_dir, progress)
            if loop.accelerator.is_main_process:
                remove_step_states(out_dir)  # superseded by the epoch's state, saved first
            if loop.show:
                log.info(_epoch_summary(loop, row, improved))
    finally:
        for tracker in loop.accelerator.trackers:  # not end_training(): that would end the process group too
            tracker.finish()
    loop.accelerator.wait_for_everyone()
    return _result(loop, out_dir, progress, time.perf_counter() - started)


def _resume(loop: TrainingLoop, out_dir: Path, key: dict) -> Progress:
    """The progress of a saved state in ``out_dir`` made from exactly ``key`` (restored into ``loop``), or a
    fresh start; a state made from anything else is removed first, and one line says why."""
    state = find_latest_state(out_dir)  # a step checkpoint goes through the same key check as an epoch's state
    if state is None:
        return _fresh(loop, key)
    changes = key_changes(read_progress(state).key, key)
    if changes:
        if loop.accelerator.is_main_process:
            log.info("%s: retraining: %s", out_dir.name, "; ".join(changes))
            discard_training(out_dir, OUTPUTS)
        loop.accelerator.wait_for_everyone()
        return _fresh(loop, key)
    progress = load_training_state(loop.accelerator, state, loop.optimizer)
    if loop.accelerator.is_main_process:
        log.info("%s: %s", out_dir.name, _resume_message(loop, progress))
    return progress


def _resume_message(loop: TrainingLoop, progress: Progress) -> str:
    if progress.partial:
        return (f"resuming at step {progress.partial['steps'] + 1} of {loop.steps_per_epoch} in epoch "
                f"{progress.partial['epoch'] + 1} of {loop.config.epochs}")
    if progress.epoch + 1 >= loop.config.epochs:
        return "reused: finished, made from the same rows, settings and weights"
    return f"resuming after epoch {progress.epoch + 1} of {loop.config.epochs}"


def _fresh(loop: TrainingLoop, key: dict) -> Progress:
    return Progress(key=key, weights_source=loop.weights_source)


def _run_epoch(loop: TrainingLoop, epoch: int, progress: Progress, out_dir: Path) -> dict:
    """Train one epoch (from its step checkpoint's position when ``progress`` is one), validate the EMA
    weights; the epoch's history row (with the new ``global_step``)."""
    loop.train_loader.set_epoch(epoch)  # the order and augmentation of this epoch: from (seed, epoch)
    loop.train_loader.dataset.set_epoch(epoch)
    totals = epoch_totals(progress.partial, epoch, loop.optimizer.param_groups[0]["lr"], loop.accelerator.is_main_process)

    def checkpoint(global_step: int) -> None:
        _save_step_checkpoint(loop, out_dir, replace(progress, global_step=global_step), totals)

    global_step = _train_epoch(loop, totals, progress.global_step, checkpoint)
    sums = summed(loop.accelerator, totals)
    images = max(1.0, sums[0])
    labels, probs, losses = _predict(loop)
    metrics = binary_metrics(labels, probs) if len(labels) else {"auc": math.nan, "ap": math.nan, "eer": math.nan, "acc_at_0.5": math.nan}
    seconds = totals.seconds
    return {
        "epoch": epoch, "lr": totals.lr,
        **{f"train_{name}": sums[i + 1] / images for i, name in enumerate(totals.sums)},
        "val_auc": metrics["auc"], "val_ap": metrics["ap"], "val_eer": metrics["eer"],
        "val_acc": metrics["acc_at_0.5"], "val_loss": float(losses.mean()) if len(losses) else math.nan,
        "train_images": int(sums[0]), "train_seconds": seconds,
        "images_per_s": sums[0] / seconds,  # all processes together
        "data_share": totals.data_seconds / seconds if seconds > 0 else math.nan,
        "global_step": global_step,
    }


def _save_step_checkpoint(loop: TrainingLoop, out_dir: Path, progress: Progress, totals: EpochTotals) -> None:
    """The whole state at this step, with the epoch's totals so far and the curves so far (every process takes part)."""
    progress.partial = saved_totals(loop.accelerator, totals)
    if loop.accelerator.is_main_process:  # before the state: a resumed run keeps the rows up to its state's step
        atomic_write(out_dir / CURVES_FILE, lambda tmp: pd.DataFrame(loop.curves).to_csv(tmp, index=False))
    save_step_state(loop.accelerator, out_dir, progress, loop.config.checkpoints_total_limit)


def _train_epoch(loop: TrainingLoop, totals: EpochTotals, global_step: int, checkpoint: Callable[[int], None]) -> int:
    """The epoch's optimiser steps from ``totals.steps`` on, counted into ``totals``; the new global step.
    ``checkpoint(global_step)`` is called every ``checkpointing_steps`` optimiser steps."""
    config, accelerator = loop.config, loop.accelerator
    train_mode(loop.model, loop.frozen)
    bar = progress_bar(total=loop.steps_per_epoch, desc=f"{loop.name} epoch {totals.epoch + 1}/{config.epochs}", unit="step",
                       disable=not loop.show, leave=False)
    bar.update(totals.steps)  # resumed within the epoch: the steps done before
    loader, batches = epoch_batches(accelerator, loop.train_loader, totals.steps * config.grad_accum_steps)
    started, before = time.perf_counter(), totals.seconds
    for step in range(totals.steps, loop.steps_per_epoch):
        learned, step_sums = _accumulate(loop, batches, totals)
        totals.steps = step + 1
        if not learned:
            continue
        for loss in totals.sums:
            totals.sums[loss] += step_sums[loss]
        log_step(accelerator, loop.curves, totals.epoch, global_step + 1, loop.optimizer.param_groups[0]["lr"],
                 {loss: value / learned for loss, value in step_sums.items()})
        if config.grad_clip:
            accelerator.clip_grad_norm_(loop.model.parameters(), config.grad_clip)
        loop.optimizer.step()
        loop.scheduler.step()
        global_step += 1
        loop.ema.update(accelerator.unwrap_model(loop.model), step=global_step)
        totals.seen += learned
        bar.update(1)
        bar.set_postfix({loss: f"{value / totals.seen:.3f}" for loss, value in totals.sums.items()})
        if loop.on_step is not None:
            loop.on_step(totals.epoch, step, global_step)
        totals.seconds = before + time.perf_counter() - started
        # not after the epoch's last step: the epoch's own state follows its validation
        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0 and step + 1 < loop.steps_per_epoch:
            checkpoint(global_step)
        crash_point("training.step")
    totals.seconds = before + time.perf_counter() - started
    bar.close()
    batches.close()  # we stop after `steps`: let accelerate forget this iteration
    if hasattr(loader, "end"):
        loader.end()
    return global_step


def _accumulate(loop: TrainingLoop, batches: Iterator, totals: EpochTotals) -> tuple[int, dict[str, float]]:
    """One optimiser step's gradients over ``grad_accum_steps`` micro-batches; (images learned, loss sums)."""
    config, accelerator = loop.config, loop.accelerator
    loop.optimizer.zero_grad(set_to_none=True)
    learned, step_sums = 0, dict.fromkeys(totals.sums, 0.0)
    for micro in range(config.grad_accum_steps):
        waited = time.perf_counter()
        batch = next(batches)
        totals.data_seconds += time.perf_counter() - waited
        _note_skipped(loop, batch["skipped"])
        _note_skipped(loop, batch.get("mask_skipped", []), what="mask")
        images, labels = batch["image"], batch["label"]
        # A batch left with < 2 readable images teaches nothing (and breaks BatchNorm). Under
        # several processes a skipped step would desynchronise them; unreadable files are rare.
        if images.shape[0] < 2:
            continue
        last = micro == config.grad_accum_steps - 1
        with nullcontext() if last else accelerator.no_sync(loop.model):  # gradients meet once per step
            losses = loop.loss_fn(loop.model, images.contiguous(memory_format=loop.memory_format), labels,
                                  masks=batch.get("mask"), has_mask=batch.get("has_mask"))
            overall = losses["overall"] / config.grad_accum_steps if config.grad_accum_steps > 1 else losses["overall"]
            accelerator.backward(overall)
        learned += images.shape[0]
        for loss in step_sums:
            step_sums[loss] += float(losses[loss].detach()) * images.shape[0]
    return learned, step_sums


def _note_skipped(loop: TrainingLoop, skipped: list[tuple[str, str]], what: str = "image") -> None:
    """Report each unusable file once; ``what``: "image" (the row is skipped) or "mask" (the row learns without one)."""
    for path, reason in skipped:
        if path not in loop.skipped and loop.show:
            log.warning("skipped unreadable %s %s: %s", what, path, reason)
        loop.skipped[path] = reason if what == "image" else f"{what} not used: {reason}"  # TrainResult.skipped


@torch.no_grad()
def _predict(loop: TrainingLoop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, fake-probabilities and cross-entropies of the EMA weights on every readable validation image, gathered."""
    model, accelerator = loop.ema.module, loop.accelerator
    model.eval()
    labels, probs, losses = [], [], []
    for batch in loop.val_loader:
        _note_skipped(loop, batch["skipped"])
        images = batch["image"]
        if images.numel() == 0:
            continue
        with accelerator.autocast():
            logits = model(images.contiguous(memory_format=loop.memory_format))["logits"].float()
        ce = torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")
        y, p, c = accelerator.gather_for_metrics((batch["label"], logits.softmax(-1)[:, 1], ce))
        labels.append(y.cpu())
        probs.append(p.cpu())
        losses.append(c.cpu())
    if not labels:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    return torch.cat(labels).numpy(), torch.cat(probs).numpy(), torch.cat(losses).numpy()


def _best_meta(loop: TrainingLoop, row: dict) -> dict:
    inputs = loop.inputs
    # interpolation recorded only when it is not the method's bilinear: a CNN expert's file stays as it was
    shape = {k: inputs[k] for k in ("image_size", "mean", "std")} | (
        {"interpolation": inputs["interpolation"]} if inputs["interpolation"] != "bilinear" else {})
    return {**shape, "epoch": row["epoch"], "val_auc": row["val_auc"], "val_loss": row["val_loss"],
            "initial_weights": loop.weights_source}


def _epoch_summary(loop: TrainingLoop, row: dict, improved: bool) -> str:
    parts = " ".join(f"{name} {row[f'train_{name}']:.4f}" for name in loss_names() if loop.config.loss.weights[name] > 0)
    return (f"{loop.name} epoch {row['epoch'] + 1}/{loop.config.epochs}: loss {row['train_overall']:.4f} {parts}"
            f" | val AUC {row['val_auc']:.4f} loss {row['val_loss']:.4f} | {row['images_per_s']:.1f} img/s"
            + (" *best*" if improved else ""))


def _result(loop: TrainingLoop, out_dir: Path, progress: Progress, seconds: float) -> TrainResult:
    history = pd.DataFrame(progress.history)
    best = progress.best_epoch
    best_auc = float(history.loc[history["epoch"] == best, "val_auc"].iloc[0]) if best >= 0 else math.nan
    return TrainResult(
        out_dir=out_dir, best_weights=out_dir / BEST_WEIGHTS, best_epoch=best, best_val_auc=best_auc,
        selection=loop.selection, history=history, config=loop.config,
        skipped=pd.DataFrame(sorted(loop.skipped.items()), columns=["path", "reason"]), seconds=seconds,
        weights_source=progress.weights_source or loop.weights_source, key=progress.key,
    )
