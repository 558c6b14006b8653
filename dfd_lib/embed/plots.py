"""The figures the method is read from (notebooks 01-02): the UMAP map by split, by family and by
re-split, and the silhouette sweep.

Every plot takes the UMAP coordinates and the manifest table row-aligned with them
(``coords[i]`` is ``table.iloc[i]``), returns the matplotlib Figure and, given ``path``,
saves it as well. Reals and fakes differ in colour and marker so the figures read in grey
too. Large tables are subsampled for drawing only (``max_points``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from dfd_lib.core.figures import save_figure  # noqa: I001 - first: it picks the headless matplotlib backend
from dfd_lib.data.manifest import CLASS_NAMES, TRAIN, VAL
from dfd_lib.data.resplit_table import resplit_columns

CLASS_COLOURS = {"real": "#1f77b4", "fake": "#d62728"}
CLASS_MARKERS = {"real": "o", "fake": "X"}
BACKGROUND = "#d9d9d9"


def _frame(coords: np.ndarray, table: pd.DataFrame, max_points: int | None, seed: int) -> pd.DataFrame:
    if len(coords) != len(table):
        raise ValueError(f"{len(coords)} coordinates for {len(table)} rows")
    frame = table.reset_index(drop=True).copy()
    frame["x"], frame["y"] = np.asarray(coords)[:, 0], np.asarray(coords)[:, 1]
    frame["class"] = frame["label"].map(CLASS_NAMES).fillna("unknown")
    if max_points is not None and len(frame) > max_points:
        frame = frame.sample(max_points, random_state=seed)
    return frame


def _scatter(ax, frame: pd.DataFrame, background: pd.DataFrame, title: str, legend: bool) -> None:
    ax.scatter(background["x"], background["y"], s=3, c=BACKGROUND, linewidths=0, rasterized=True)
    sns.scatterplot(data=frame, x="x", y="y", hue="class", style="class", palette=CLASS_COLOURS,
                    markers=CLASS_MARKERS, hue_order=["real", "fake"], style_order=["real", "fake"],
                    s=14, alpha=0.75, linewidth=0, ax=ax, legend=legend, rasterized=True)
    ax.set_title(f"{title} (n={len(frame)})")
    ax.set(xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[])


def _finish(fig: plt.Figure, path: str | os.PathLike | None) -> plt.Figure:
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_official_split(coords: np.ndarray, table: pd.DataFrame, path: str | os.PathLike | None = None,
                        max_points: int | None = 30000, seed: int = 0) -> plt.Figure:
    """Official train and val panels (reals/fakes), plus both sets overlaid by split."""
    frame = _frame(coords, table, max_points, seed)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), sharex=True, sharey=True)
    for ax, split in zip(axes[:2], (TRAIN, VAL)):
        _scatter(ax, frame[frame["split"] == split], frame, f"official {split}", legend=split == TRAIN)
    overlay = frame[frame["split"].isin([TRAIN, VAL])]
    sns.scatterplot(data=overlay, x="x", y="y", hue="split", hue_order=[TRAIN, VAL], s=10, alpha=0.5,
                    linewidth=0, ax=axes[2], rasterized=True)
    axes[2].set_title("train vs val")
    axes[2].set(xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[])
    return _finish(fig, path)


def plot_by_family(coords: np.ndarray, table: pd.DataFrame, path: str | os.PathLike | None = None,
                   max_points: int | None = 30000, seed: int = 0) -> plt.Figure:
    """All rows coloured by fake family (reals are the family ``real``), marker by class."""
    frame = _frame(coords, table, max_points, seed)
    families = sorted(frame["family"].astype(str).unique(), key=lambda f: (f != "real", f))
    fig, ax = plt.subplots(figsize=(8, 6))
    sns.scatterplot(data=frame.assign(family=frame["family"].astype(str)), x="x", y="y", hue="family",
                    hue_order=families, style="class", markers=CLASS_MARKERS, style_order=["real", "fake"],
                    palette=sns.color_palette("tab10" if len(families) <= 10 else "husl", len(families)),
                    s=14, alpha=0.75, linewidth=0, ax=ax, rasterized=True)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.set_title("UMAP by family")
    ax.set(xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[])
    return _finish(fig, path)


def plot_resplits(coords: np.ndarray, table: pd.DataFrame, splits: pd.DataFrame | None = None,
                  which: Sequence[int] | None = None, path: str | os.PathLike | None = None,
                  max_points: int | None = 30000, seed: int = 0) -> plt.Figure:
    """For several re-splits (default: the first four), a train panel and a val panel, reals vs
    fakes. ``splits`` holds the ``resplit_<i>`` columns (default: ``table``'s own)."""
    splits = table if splits is None else splits
    columns = resplit_columns(splits)
    if not columns:
        raise ValueError("no resplit_<i> columns to plot; run leave_one_cluster_out first")
    chosen = [columns[i] for i in (which if which is not None else range(min(4, len(columns))))]
    sides = splits[chosen].reindex(table.index).reset_index(drop=True)
    frame = _frame(coords, pd.concat([table.drop(columns=resplit_columns(table)).reset_index(drop=True), sides],
                                     axis=1), max_points, seed)
    fig, axes = plt.subplots(len(chosen), 2, figsize=(10, 4.2 * len(chosen)), sharex=True, sharey=True, squeeze=False)
    for row, column in enumerate(chosen):
        for col, side in enumerate((TRAIN, VAL)):
            _scatter(axes[row, col], frame[frame[column] == side], frame, f"{column} {side}", legend=row == col == 0)
    return _finish(fig, path)


def plot_silhouette(sweep: pd.DataFrame, path: str | os.PathLike | None = None) -> plt.Figure:
    """Silhouette score against K from :func:`dfd_lib.embed.clusters.silhouette_sweep`, best K marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=sweep, x="k", y="silhouette", marker="o", ax=ax)
    best = sweep.loc[sweep["silhouette"].idxmax()]
    ax.axvline(best["k"], color="grey", linestyle="--", linewidth=1)
    ax.set_title(f"silhouette by K (best K={int(best['k'])})")
    ax.set_xticks(sweep["k"].tolist())
    return _finish(fig, path)
