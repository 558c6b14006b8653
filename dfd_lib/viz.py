"""The 2-D map of the embeddings (UMAP) and the figures the method is read from.

Every plot takes the UMAP coordinates and the manifest table row-aligned with them
(``coords[i]`` is ``table.iloc[i]``), returns the matplotlib Figure and, given ``path``,
saves it as well. Reals and fakes differ in colour and marker so the figures read in grey
too. Large tables are subsampled for drawing only (``max_points``).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))  # headless by default; Jupyter sets its own
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dfd_lib.split import resplit_columns  # noqa: E402

CLASS_NAMES = {0: "real", 1: "fake"}
CLASS_COLOURS = {"real": "#1f77b4", "fake": "#d62728"}
CLASS_MARKERS = {"real": "o", "fake": "X"}
BACKGROUND = "#d9d9d9"
LARGE_MAP_ROWS = 50_000  # beyond this, fit_umap's defaults trade a little layout polish for speed


def fit_umap(emb: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int | None = 0,
             pca_dims: int | None = 50, n_epochs: int | None = None, low_memory: bool = True,
             metric: str = "euclidean", init: str | None = None) -> np.ndarray:
    """UMAP coordinates (N, 2) of ``emb``. Rows are first reduced to ``pca_dims`` with PCA (much
    faster neighbour search, same picture). A fixed ``seed`` makes the map reproducible but
    single-threaded (umap-learn's rule); ``seed=None`` uses every core. ``n_epochs`` and
    ``init`` left as None follow umap-learn (spectral start; 500 epochs up to 10k rows, 200
    above) up to ``LARGE_MAP_ROWS`` rows, and beyond it use 100 epochs and a PCA start, which
    keeps 100k rows under ~1.5 min on 2 cores (bench/RESULTS.md)."""
    import umap
    from sklearn.decomposition import PCA

    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2 or len(x) < 4:
        raise ValueError(f"fit_umap needs a 2-D array of at least 4 rows, got shape {x.shape}")
    if pca_dims is not None and x.shape[1] > pca_dims and len(x) > pca_dims:
        x = PCA(pca_dims, random_state=seed or 0).fit_transform(x).astype(np.float32)
    large = len(x) > LARGE_MAP_ROWS
    n_epochs = n_epochs if n_epochs is not None else (100 if large else None)
    init = init or ("pca" if large else "spectral")
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(x) - 1), min_dist=min_dist, random_state=seed,
                        n_epochs=n_epochs, low_memory=low_memory, metric=metric, init=init,
                        n_jobs=1 if seed is not None else -1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*")  # the seed/parallelism trade-off is documented above
        warnings.filterwarnings("ignore", message="Graph is not fully connected")  # separate domains are expected
        return reducer.fit_transform(x).astype(np.float32)


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


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
    for ax, split in zip(axes[:2], ("train", "val")):
        _scatter(ax, frame[frame["split"] == split], frame, f"official {split}", legend=split == "train")
    overlay = frame[frame["split"].isin(["train", "val"])]
    sns.scatterplot(data=overlay, x="x", y="y", hue="split", hue_order=["train", "val"], s=10, alpha=0.5,
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
        for col, side in enumerate(("train", "val")):
            _scatter(axes[row, col], frame[frame[column] == side], frame, f"{column} {side}", legend=row == col == 0)
    return _finish(fig, path)


def plot_silhouette(sweep: pd.DataFrame, path: str | os.PathLike | None = None) -> plt.Figure:
    """Silhouette score against K from :func:`dfd_lib.split.silhouette_sweep`, best K marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=sweep, x="k", y="silhouette", marker="o", ax=ax)
    best = sweep.loc[sweep["silhouette"].idxmax()]
    ax.axvline(best["k"], color="grey", linestyle="--", linewidth=1)
    ax.set_title(f"silhouette by K (best K={int(best['k'])})")
    ax.set_xticks(sweep["k"].tolist())
    return _finish(fig, path)
