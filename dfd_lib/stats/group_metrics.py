"""Per-family, per-cluster, per-source tables of :func:`dfd_lib.stats.metrics.binary_metrics`, with
bootstrap intervals (:mod:`dfd_lib.stats.bootstrap`) when asked."""
from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd

from dfd_lib.data.manifest import REAL
from dfd_lib.stats.bootstrap import BootstrapConfig, metrics_with_intervals
from dfd_lib.stats.metrics import binary_metrics


def _with_intervals(labels, scores, config: BootstrapConfig) -> dict:
    return metrics_with_intervals(labels, scores, config)


def per_group_metrics(table: pd.DataFrame, scores, by: str = "family", reals_with_every_group: bool = True,
                      bootstrap=None) -> pd.DataFrame:
    """One row of :func:`binary_metrics` per value of ``table[by]`` (``family``, ``cluster``,
    ``source`` ...), plus an ``(all)`` row; with ``bootstrap`` (a
    :class:`~dfd_lib.stats.bootstrap.BootstrapConfig`) each row also holds its intervals.

    A group of fakes only (a fake family) cannot have an AUC on its own; with
    ``reals_with_every_group`` such a group is scored against all the reals of the table,
    the usual per-family protocol. ``mean_score`` is the group's own mean score."""
    measure = binary_metrics if bootstrap is None else functools.partial(_with_intervals, config=bootstrap)
    if by not in table.columns:
        raise ValueError(f"table has no column {by!r} (columns: {', '.join(map(str, table.columns))})")
    if "label" not in table.columns:
        raise ValueError("table has no 'label' column")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size != len(table):
        raise ValueError(f"{scores.size} scores for a table of {len(table)} rows")
    labels = table["label"].to_numpy().astype(int)
    reals = labels == REAL
    rows = []
    for group, index in table.groupby(by, sort=True, dropna=False).indices.items():
        mask = np.zeros(len(table), dtype=bool)
        mask[index] = True
        own_mean = float(scores[mask].mean())
        paired = reals_with_every_group and not reals[mask].any() and reals.any()
        if paired:
            mask |= reals
        row = {by: group, **measure(labels[mask], scores[mask]), "mean_score": own_mean}
        if paired:
            row["reason"] = "fakes of this group scored against all reals"
        rows.append(row)
    rows.append({by: "(all)", **measure(labels, scores), "mean_score": float(scores.mean()) if scores.size else math.nan})
    return pd.DataFrame(rows)
