"""One expert per re-split, then their mixture: train on the rows whose ``resplit_<i>`` is ``train``,
select on those whose ``resplit_<i>`` is ``val`` (the held-out cluster), and save the experts' best
EMA weights as one mixture in our checkpoint format (:mod:`dfd_lib.models.checkpoints`)."""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from accelerate import PartialState

from dfd_lib.data.manifest import TRAIN, VAL
from dfd_lib.data.resplit_table import resplit_column, resplit_indices
from dfd_lib.models.checkpoints import mixture_from_experts, save_mixture
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import TrainResult
from dfd_lib.training.training_pool import TrainingJob, run_trainings

MIXTURE_DIR = "mixture"  # under out_dir, when no mixture_dir is given


@dataclass
class MixtureTrainResult:
    directory: Path  # the mixture in our weights format (dfd_lib.models.checkpoints)
    experts: list[TrainResult]
    summary: pd.DataFrame  # one row per expert: resplit, backbone, best epoch, best val AUC
    seconds: float = math.nan  # wall time of all the experts' training


def expert_dir(out_dir: str | os.PathLike, resplit: int) -> Path:
    """Where the expert of re-split ``resplit`` trains: ``out_dir/expert_<i>``."""
    return Path(out_dir) / f"expert_{int(resplit)}"


def train_on_resplit(table: pd.DataFrame, resplit: int, config: TrainConfig, out_dir: str | os.PathLike,
                     resume: bool = True) -> TrainResult:
    """The expert of re-split ``resplit``, trained in ``out_dir``."""
    return resplit_job(table, resplit, config, out_dir, resume).run()


def resplit_job(table: pd.DataFrame, resplit: int, config: TrainConfig, out_dir: str | os.PathLike,
                resume: bool = True) -> TrainingJob:
    """The training of :func:`train_on_resplit`, to run later or beside others (:mod:`dfd_lib.training.training_pool`)."""
    side = table[resplit_column(resplit)]
    return TrainingJob(table[side == TRAIN], table[side == VAL], config, Path(out_dir), resume)


def train_mixture(
    table: pd.DataFrame,
    config: TrainConfig | Sequence[TrainConfig],
    out_dir: str | os.PathLike,
    resplits: Sequence[int] | None = None,
    resume: bool = True,
    mixture_dir: str | os.PathLike | None = None,
    provenance: Mapping[str, str] | None = None,
    processes: int = 1,
) -> MixtureTrainResult:
    """One expert per re-split in ``out_dir/expert_<i>``, then their best EMA weights saved as a
    mixture in ``mixture_dir`` (default ``out_dir/mixture``). ``config`` is shared or one per
    re-split (the backbone may differ per expert). ``provenance`` (e.g. what the images are,
    :attr:`dfd_lib.training.training_data.TrainingData.provenance`) joins the mixture config's. ``processes`` > 1
    trains that many experts at once, each in its own process (:mod:`dfd_lib.training.training_pool`): the
    same weights as one after another."""
    started = time.perf_counter()
    chosen, jobs = expert_jobs(table, config, out_dir, resplits, resume)
    return save_experts_mixture(chosen, run_trainings(jobs, processes), out_dir, mixture_dir, provenance, started)


def expert_jobs(table: pd.DataFrame, config: TrainConfig | Sequence[TrainConfig], out_dir: str | os.PathLike,
                resplits: Sequence[int] | None = None, resume: bool = True) -> tuple[list[int], list[TrainingJob]]:
    """The re-splits chosen and the training of each one's expert (:func:`train_mixture`'s, to run beside others)."""
    available = resplit_indices(table)
    chosen = list(available if resplits is None else resplits)
    missing = sorted(set(chosen) - set(available))
    if missing or not chosen:
        raise ValueError(f"re-splits {missing or chosen} not in the table (it has resplit_ columns for {available})")
    configs = [config] * len(chosen) if isinstance(config, TrainConfig) else list(config)
    if len(configs) != len(chosen):
        raise ValueError(f"{len(configs)} configs for {len(chosen)} re-splits")
    return chosen, [resplit_job(table, i, cfg, expert_dir(out_dir, i), resume) for i, cfg in zip(chosen, configs)]


def save_experts_mixture(chosen: Sequence[int], results: Sequence[TrainResult], out_dir: str | os.PathLike,
                         mixture_dir: str | os.PathLike | None = None, provenance: Mapping[str, str] | None = None,
                         started: float | None = None) -> MixtureTrainResult:
    """The trained experts of re-splits ``chosen`` as a mixture saved in ``mixture_dir`` (default ``out_dir/mixture``)."""
    results = list(results)
    summary = pd.DataFrame([
        {"resplit": i, "backbone": r.config.backbone, "best_epoch": r.best_epoch, "best_val_auc": r.best_val_auc,
         "selection": r.selection, "images_per_s": float(r.history["images_per_s"].mean()), "seconds": r.seconds}
        for i, r in zip(chosen, results)
    ])
    recorded = {"trained_by": "dfd_lib.training.mixture_training.train_mixture", "resplits": ",".join(map(str, chosen)),
                "best_val_auc": ",".join(f"{r.best_val_auc:.4f}" for r in results), **(provenance or {})}
    directory = Path(mixture_dir) if mixture_dir is not None else Path(out_dir) / MIXTURE_DIR
    model, mixture_config = mixture_from_experts([r.best_weights for r in results], recorded)

    if PartialState().is_main_process:
        save_mixture(model, directory, mixture_config)
    seconds = time.perf_counter() - started if started is not None else sum(r.seconds for r in results)
    return MixtureTrainResult(directory=directory, experts=results, summary=summary, seconds=seconds)
