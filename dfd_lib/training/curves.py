"""Training curves of a run: every training's per-step losses and learning rate (``curves.csv``, see
:mod:`dfd_lib.training.trainer`) and per-epoch validation (``history.csv``), in one table and
one figure. The same numbers reach accelerate's trackers while training runs
(``tensorboard --logdir reports/<run>/experts``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from dfd_lib.core.figures import save_figure
from dfd_lib.training.loss_terms import get_loss_term
from dfd_lib.training.losses import loss_names
from dfd_lib.training.trainer import CURVES_FILE, HISTORY_FILE

PANEL_COLUMNS = 3


def loss_panels() -> tuple[str, ...]:
    """The loss parts the figure shows, one panel each: the total, then every registered term."""
    return ("overall", *loss_names())


def _unused(part: str, curves: pd.DataFrame) -> bool:
    """Whether ``part`` is a term off by default (the ``mask`` term) that no training used: all its curve is 0."""
    return part != "overall" and get_loss_term(part).default_weight == 0 and bool((curves[f"loss_{part}"].fillna(0) == 0).all())


def read_curves(experts_dir: str | os.PathLike, file_name: str = CURVES_FILE) -> pd.DataFrame:
    """One table of every training under ``experts_dir`` that wrote ``file_name``, with a ``training`` column."""
    frames = []
    for path in sorted(Path(experts_dir).glob(f"*/{file_name}")):
        frame = pd.read_csv(path)
        if len(frame):
            frames.append(frame.assign(training=path.parent.name))
    if not frames:
        raise FileNotFoundError(f"no training under {experts_dir} wrote {file_name} (run notebook 04 first)")
    return pd.concat(frames, ignore_index=True)


def plot_training_curves(experts_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                         smoothing: int = 5) -> plt.Figure:
    """Each loss part per step (a rolling mean over ``smoothing`` steps), the learning rate, and the
    validation AUC per epoch, one line per training; saved to ``path`` when given."""
    curves = read_curves(experts_dir)
    history = read_curves(experts_dir, HISTORY_FILE)
    trainings = list(dict.fromkeys(curves["training"]))
    colours = dict(zip(trainings, plt.get_cmap("tab20")(range(len(trainings))), strict=False))
    # a term registered after these trainings has no curve; one off by default and off in all of them has no panel
    panels = [part for part in loss_panels() if f"loss_{part}" in curves and not _unused(part, curves)]
    rows_of_panels = math.ceil((len(panels) + 2) / PANEL_COLUMNS)  # + learning rate and validation AUC
    fig, axes = plt.subplots(rows_of_panels, PANEL_COLUMNS, figsize=(15, 3.75 * rows_of_panels))
    for ax in axes.flat[len(panels) + 2:]:
        ax.set_axis_off()
    for ax, part in zip(axes.flat, panels, strict=False):
        for name, rows in curves.groupby("training", sort=False):
            ax.plot(rows["step"], rows[f"loss_{part}"].rolling(smoothing, min_periods=1).mean(), color=colours[name], lw=1.2)
        ax.set(title=f"{part} loss (train, mean of {smoothing} steps)", xlabel="step")
    lr_ax, auc_ax = axes.flat[len(panels)], axes.flat[len(panels) + 1]
    for name, rows in curves.groupby("training", sort=False):
        lr_ax.plot(rows["step"], rows["lr"], color=colours[name], lw=1.2, label=name)
    lr_ax.set(title="learning rate", xlabel="step")
    for name, rows in history.groupby("training", sort=False):
        auc_ax.plot(rows["epoch"] + 1, rows["val_auc"], marker="o", color=colours.get(name), lw=1.2)
    auc_ax.set(title="validation AUC (EMA weights) per epoch", xlabel="epoch")
    fig.legend(*lr_ax.get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Training curves of every training of this run")
    fig.tight_layout(rect=(0, 0, 0.86, 0.96))
    save_figure(fig, path)
    return fig
