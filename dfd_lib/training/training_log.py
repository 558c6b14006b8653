"""What a training logs while it runs: every optimiser step's losses and learning rate, and every
epoch's validation metrics, to ``curves.csv`` (read by :mod:`dfd_lib.training.curves`) and to
accelerate's trackers (``TrainConfig.log_with``, TensorBoard by default)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
from accelerate.tracking import _available_trackers

from dfd_lib.training.train_config import TrainConfig

CURVES_FILE = "curves.csv"
TRACKER_PROJECT = "tensorboard"  # the trackers' run name, a folder of out_dir for TensorBoard
log = logging.getLogger(__name__)


def read_curves(out_dir: Path, global_step: int) -> list[dict]:
    """The step rows of the finished epochs of a resumed run (a later, unfinished epoch's are not kept)."""
    path = out_dir / CURVES_FILE
    if not path.is_file():
        return []
    curves = pd.read_csv(path)
    return curves[curves["step"] <= global_step].to_dict("records")


def log_step(accelerator, curves: list[dict], epoch: int, step: int, lr: float, losses: dict[str, float]) -> None:
    """One optimiser step's losses (this process's batches) and learning rate, to the curves and trackers."""
    curves.append({"step": step, "epoch": epoch + 1, "lr": lr, **{f"loss_{name}": value for name, value in losses.items()}})
    accelerator.log({**{f"loss/{name}": value for name, value in losses.items()}, "lr": lr}, step=step)


def log_epoch(accelerator, row: dict, global_step: int) -> None:
    """An epoch's validation metrics (those that are defined) to the trackers."""
    names = ("val_auc", "val_ap", "val_eer", "val_loss")
    values = {f"val/{name[4:]}": row[name] for name in names if not math.isnan(row[name])}
    accelerator.log({**values, "epoch": row["epoch"] + 1}, step=global_step)


def tracker_config(config: TrainConfig) -> dict:
    """The config as the flat scalars trackers take (TensorBoard's hyper-parameters)."""
    flat = {}
    for key, value in config.to_dict().items():
        values = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in values:
            if isinstance(item, (int, float, str, bool)):
                flat[name if name == key else f"{key}.{name}"] = item
    return flat


def trackers(config: TrainConfig) -> list[str]:
    """The trackers asked for that are installed (a missing one is said, never fatal: curves.csv stays)."""
    available = sorted(str(getattr(tracker, "value", tracker)) for tracker in _available_trackers)
    wanted = [name.strip() for name in config.log_with.split(",") if name.strip() and name.strip() != "none"]
    missing = [name for name in wanted if name not in available]
    if missing:
        log.warning("training curves: tracker(s) %s not installed or unknown (available: %s); curves.csv is still written",
                    missing, available)
    return [name for name in wanted if name not in missing]
