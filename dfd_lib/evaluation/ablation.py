"""Notebook 04's loss ablation: one expert trained again with CE only, CE + each other loss term
(NCE, KL) and all of them, and its table on the test split.

The variants and the table's weight columns come from the loss-term registry
(:mod:`dfd_lib.training.loss_terms`): a registered term takes part once it has a weight (by
default, or in the experts' config), so with the built-in terms the variants are "CE only",
"CE + NCE", "CE + KL" and "CE + NCE + KL"."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dfd_lib.evaluation.comparison import metric_columns, metrics_row, score_experts
from dfd_lib.stats.bootstrap import BootstrapConfig
from dfd_lib.training.loss_terms import loss_names, loss_terms
from dfd_lib.training.losses import LossConfig
from dfd_lib.training.mixture_training import MixtureTrainResult, resplit_job
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import TrainResult
from dfd_lib.training.training_pool import run_trainings


def ablation_variants(loss: LossConfig | None = None) -> dict[str, tuple[str, ...]]:
    """Variant name -> the loss terms it switches on: the first term alone ("CE only"), with each
    other term ("CE + NCE", ...), then with all of them ("CE + NCE + KL"). The terms are those with
    a weight in ``loss`` or by default (a term off by default and in ``loss`` takes no part)."""
    terms = [term for term in loss_terms() if term.default_weight > 0 or (loss is not None and loss.weights[term.name] > 0)]
    first, others = terms[0], terms[1:]
    variants = {f"{first.label} only": (first.name,)}
    variants.update({f"{first.label} + {term.label}": (first.name, term.name) for term in others})
    if len(others) > 1:
        variants[" + ".join(term.label for term in terms)] = tuple(term.name for term in terms)
    return variants


def all_losses_variant(loss: LossConfig | None = None) -> str:
    """The name of the variant with every term on ("CE + NCE + KL" with the built-in terms)."""
    return list(ablation_variants(loss))[-1]


def __getattr__(name: str) -> Any:
    # the variants at the default weights, read when asked for (loss terms can be registered later)
    if name == "ABLATION_VARIANTS":
        return ablation_variants()
    if name == "ALL_LOSSES":
        return all_losses_variant()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def weight_columns() -> list[str]:
    """The table's weight columns: every registered term's."""
    return [term.weight_name for term in loss_terms()]


@dataclass
class AblationResult:
    resplit: int
    results: dict[str, TrainResult]  # variant -> its training
    reused: str | None  # the variant taken from the experts' training instead of trained again
    seconds: float  # training time of the variants trained here

    def weights(self) -> dict[str, Path]:
        return {name: result.best_weights for name, result in self.results.items()}


def ablation_config(config: TrainConfig, losses: Sequence[str], max_steps_per_epoch: int = 0) -> TrainConfig:
    """``config`` with only ``losses`` switched on (at their configured weight, or the default
    weight where ``config`` has them off) and, if > 0, a cap on the steps per epoch."""
    unknown = sorted(set(losses) - set(loss_names()))
    if unknown:
        raise ValueError(f"no loss term(s) {unknown} (registered: {', '.join(loss_names())})")
    weights = {term.name: (getattr(config.loss, term.weight_name) or term.default_weight) if term.name in losses else 0.0
               for term in loss_terms()}
    weightless = [name for name in losses if not weights[name]]
    if weightless:
        raise ValueError(f"loss term(s) {weightless} are off in the config and by default: give them a weight to ablate them")
    steps = config.max_steps_per_epoch  # 0 = whole epochs
    if max_steps_per_epoch > 0:
        steps = min(max_steps_per_epoch, steps) if steps else max_steps_per_epoch
    return dataclasses.replace(config, loss=config.loss.with_weights(weights), max_steps_per_epoch=steps)


def loss_ablation(
    trainval: pd.DataFrame,
    experts: MixtureTrainResult,
    out_dir: str | os.PathLike,
    resplit: int | None = None,
    max_steps_per_epoch: int = 0,
    resume: bool = True,
    enabled: bool = True,
    processes: int = 1,
) -> AblationResult:
    """The expert of re-split ``resplit`` (default: the first trained) again with each loss
    combination of :func:`ablation_variants` (of its config), its own config otherwise. The
    experts' run of that re-split is reused for the all-terms variant when it is that variant,
    i.e. when ``max_steps_per_epoch`` does not shorten the ablation; otherwise all variants are
    trained at the same budget. ``enabled=False`` trains nothing and returns an empty result. ``processes`` > 1
    trains that many variants at once (:mod:`dfd_lib.training.training_pool`)."""
    resplits = [int(i) for i in experts.summary["resplit"]]
    resplit = resplits[0] if resplit is None else int(resplit)
    if resplit not in resplits:
        raise ValueError(f"re-split {resplit} has no expert; the experts cover re-splits {resplits}")
    if not enabled:
        return AblationResult(resplit=resplit, results={}, reused=None, seconds=0.0)
    own = experts.experts[resplits.index(resplit)]
    out_dir = Path(out_dir)
    results: dict[str, TrainResult | None] = {}
    jobs = {}
    reused = None
    started = time.perf_counter()
    for name, losses in ablation_variants(own.config.loss).items():
        variant = ablation_config(own.config, losses, max_steps_per_epoch)
        if own.config == variant:
            results[name], reused = own, name
            continue
        results[name] = None  # trained below, in the variants' order
        jobs[name] = resplit_job(trainval, resplit, variant, out_dir / f"ablation_{resplit}_{'_'.join(losses)}", resume)
    results.update(zip(jobs, run_trainings(list(jobs.values()), processes)))
    return AblationResult(resplit=resplit, results=results, reused=reused, seconds=time.perf_counter() - started)


def ablation_table(ablation: AblationResult, test: pd.DataFrame, batch_size: int = 64, device: str | None = None,
                   progress: bool = True, bootstrap: BootstrapConfig | None = None) -> pd.DataFrame:
    """Each loss combination of the ablation: its weights, optimiser steps, validation AUC on
    the held-out cluster and its metrics on the test split with their ``bootstrap`` intervals
    (empty when the ablation did not run)."""
    columns = [*weight_columns(), "epochs", "steps", "val_auc", *metric_columns(), "train_seconds", "reused"]
    if not ablation.results:
        return pd.DataFrame(columns=columns).rename_axis("losses")
    scores = score_experts(ablation.weights(), test, batch_size=batch_size, device=device, progress=progress)
    readable = scores.notna().all(axis=1).to_numpy()
    labels = test["label"].to_numpy().astype(int)[readable]
    rows = {}
    for name, result in ablation.results.items():
        loss, history = result.config.loss, result.history
        steps_per_epoch = int(np.ceil(history["train_images"] / result.config.batch_size).max()) if len(history) else 0
        rows[name] = {**{column: getattr(loss, column) for column in weight_columns()},
                      "epochs": result.config.epochs, "steps": steps_per_epoch * result.config.epochs,
                      "val_auc": result.best_val_auc, **metrics_row(labels, scores.loc[readable, name].to_numpy(), bootstrap),
                      "train_seconds": float(history["train_seconds"].sum()) if len(history) else math.nan,
                      "reused": name == ablation.reused}
    return pd.DataFrame.from_dict(rows, orient="index")[columns].rename_axis("losses")
