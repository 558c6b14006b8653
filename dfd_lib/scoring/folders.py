"""Scoring many images at once: a folder or a manifest split into one table, a summary, a
histogram of the scores and a sortable view of the table (notebook 05).

The table has one row per image: ``path``, ``name``, ``label`` (0 real / 1 fake, NaN when
unknown), ``prob_fake``, ``prob_expert_<i>``, ``verdict`` (``fake`` / ``real`` at the
threshold, ``error`` when unreadable) and ``error`` (the reason, empty when scored), plus
the manifest's ``family`` and ``source`` when scored from a manifest.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from dfd_lib.core.figures import save_figure
from dfd_lib.data.manifest import FAKE, REAL, Manifest
from dfd_lib.scoring.calibration import VerdictThreshold
from dfd_lib.scoring.inputs import expand_inputs, label_from_path
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.stats.metrics import binary_metrics


def add_verdicts(table: pd.DataFrame, threshold: float | VerdictThreshold) -> pd.DataFrame:
    """``verdict`` at ``threshold``: fake if ``prob_fake >= threshold``; ``error`` if unscored.
    A :class:`~dfd_lib.scoring.calibration.VerdictThreshold` (the mixture's calibrated one, a
    given one or 0.5) also writes which threshold and where it came from (``threshold``,
    ``threshold_source``)."""
    value = threshold.value if isinstance(threshold, VerdictThreshold) else threshold
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {value}")
    table = table.copy()
    scored = table["error"].fillna("") == ""
    table["verdict"] = np.where(~scored, "error", np.where(table["prob_fake"].fillna(-1) >= value, "fake", "real"))
    if isinstance(threshold, VerdictThreshold):
        table["threshold"], table["threshold_source"] = value, threshold.source
    return table


def score_paths(predictor: Predictor, paths, labels=None, threshold: float | VerdictThreshold = 0.5,
                progress: bool = True) -> pd.DataFrame:
    paths = [str(p) for p in paths]
    table = predictor.predict_paths(paths, progress=progress)
    table.insert(1, "name", [Path(p).name for p in paths])
    table.insert(2, "label", [label_from_path(p) for p in paths] if labels is None else list(labels))
    return add_verdicts(table, threshold)


def score_dataset(
    predictor: Predictor,
    folder: str | os.PathLike = "",
    manifest: str | os.PathLike | None = None,
    split: str = "test",
    threshold: float = 0.5,
    limit: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Score every image under ``folder`` (recursively; labels from ``real``/``fake`` folder
    names), or, when ``folder`` is empty, the ``split`` rows of ``manifest`` (all rows if
    ``split`` is empty). ``limit`` > 0 scores a random subset of that many images."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if str(folder):
        paths, problems = expand_inputs([str(folder)])
        if not paths:
            raise FileNotFoundError(problems[0] if problems else f"{folder}: no images")
        if limit and len(paths) > limit:
            keep = np.random.default_rng(seed).choice(len(paths), limit, replace=False)
            paths = [paths[i] for i in sorted(keep)]
        return score_paths(predictor, paths, threshold=threshold, progress=progress)
    if manifest is None:
        raise ValueError("give a folder to score or a manifest to take a split from")
    rows = Manifest.load(manifest).table
    if split:
        if split not in set(rows["split"]):
            raise ValueError(f"{manifest}: no rows in split {split!r}; splits: {sorted(set(rows['split']))}")
        rows = rows[rows["split"] == split]
    if limit and len(rows) > limit:
        rows = rows.sample(n=limit, random_state=seed).sort_index()
    table = score_paths(predictor, rows["path"], labels=rows["label"].astype(float), threshold=threshold, progress=progress)
    for column in ("family", "source"):
        if column in rows:
            table.insert(3, column, rows[column].to_numpy())
    return table


def top_scored(table: pd.DataFrame, count: int, highest: bool = True) -> list[str]:
    """Paths of up to ``count`` scored images, highest (or lowest) fake probability first."""
    scored = table[table["error"].fillna("") == ""].sort_values("prob_fake", ascending=not highest)
    return list(scored["path"].head(count))


def summarize(table: pd.DataFrame, threshold: float | VerdictThreshold) -> dict:
    """Counts, and the detection metrics where the table knows both classes (with a
    :class:`~dfd_lib.scoring.calibration.VerdictThreshold`: also where the threshold came from,
    and the false-positive rate beside the calibration's target)."""
    verdicts = threshold if isinstance(threshold, VerdictThreshold) else None
    threshold = verdicts.value if verdicts else threshold
    scored = table[table["error"].fillna("") == ""]
    summary = {
        "images": int(len(table)),
        "scored": int(len(scored)),
        "unreadable": int(len(table) - len(scored)),
        "threshold": float(threshold),
        **({"threshold_source": verdicts.source} if verdicts else {}),
        "flagged_fake": int((scored["prob_fake"] >= threshold).sum()),
        "mean_prob_fake": float(scored["prob_fake"].mean()) if len(scored) else math.nan,
    }
    labelled = scored[scored["label"].notna()]
    if len(labelled):
        metrics = binary_metrics(labelled["label"].astype(int), labelled["prob_fake"])
        summary.update({k: metrics[k] for k in ("n_real", "n_fake", "auc", "ap", "eer")})
        summary["accuracy_at_threshold"] = float(((labelled["prob_fake"] >= threshold) == (labelled["label"] == FAKE)).mean())
        flagged, reals = labelled["prob_fake"] >= threshold, labelled["label"] == REAL
        summary["fpr_at_threshold"] = float(flagged[reals].mean()) if reals.any() else math.nan
        summary["tpr_at_threshold"] = float(flagged[~reals].mean()) if (~reals).any() else math.nan
        if verdicts and verdicts.calibration and verdicts.calibration.target_fpr is not None:
            summary["target_fpr"] = verdicts.calibration.target_fpr
        if metrics["reason"]:
            summary["note"] = metrics["reason"]
    return summary


def plot_score_histogram(table: pd.DataFrame, threshold: float, path: str | os.PathLike | None = None,
                         bins: int = 30, title: str = "Fake probability"):
    """Scores stacked by label (real / fake / unlabelled), with the threshold drawn."""
    scored = table[table["error"].fillna("") == ""]
    groups = [("real", scored["label"] == REAL, "#2e7d32"), ("fake", scored["label"] == FAKE, "#c62828"),
              ("unlabelled", scored["label"].isna(), "#78909c")]
    data = [(name, scored.loc[mask, "prob_fake"], colour) for name, mask, colour in groups if mask.any()]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if data:
        ax.hist([d[1] for d in data], bins=np.linspace(0, 1, bins + 1), stacked=True,
                color=[d[2] for d in data], label=[f"{d[0]} ({len(d[1])})" for d in data])
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
    ax.set(xlabel="fake probability (mixture)", ylabel="images", title=title, xlim=(0, 1))
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def sortable_table(table: pd.DataFrame, rows: int = 25, sort_by: str = "prob_fake", ascending: bool = False) -> widgets.VBox:
    """The table with a column chooser and a direction toggle (live in Jupyter and Voilà;
    a static page shows the initial order: highest fake probability first)."""
    if sort_by not in table.columns:
        raise ValueError(f"no column {sort_by!r}; columns: {list(table.columns)}")
    shown = [c for c in table.columns if c != "path"]
    column = widgets.Dropdown(options=shown, value=sort_by, description="sort by")
    direction = widgets.ToggleButtons(options=["descending", "ascending"], value="ascending" if ascending else "descending")
    count = widgets.BoundedIntText(value=rows, min=1, max=max(len(table), 1), description="rows")
    view = widgets.HTML()

    def render(_change=None):
        ordered = table.sort_values(column.value, ascending=direction.value == "ascending", na_position="last")
        view.value = ordered[shown].head(count.value).to_html(index=False, float_format="{:.4f}".format, na_rep="")

    for control in (column, direction, count):
        control.observe(render, names="value")
    render()
    return widgets.VBox([widgets.HBox([column, direction, count]), view])
