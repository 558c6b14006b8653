"""Scoring a detector: AUC, average precision, EER, TPR at a low false-positive rate (1 % and
0.1 %) with the threshold it implies, accuracy; ROC curves; per-family and per-cluster tables
(intervals are :mod:`dfd_lib.modeling.bootstrap`, robustness :mod:`dfd_lib.modeling.robustness`).

Scores are fake-probabilities (label 1 = fake). Metrics that need both classes are NaN, with
the reason in ``reason``, when a set holds only one class.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from dfd_lib.data.manifest import REAL
from dfd_lib.figures import save_figure

# The competition's organisers: top teams had high AUC but weak true-positive rates at low
# false-positive rates. A TPR at these FPRs is reported beside every AUC.
LOW_FPRS = (0.01, 0.001)
FPR_TOLERANCE = 1e-12  # an FPR of exactly max_fpr, up to float rounding, is within it


def fpr_label(max_fpr: float) -> str:
    """``0.01 -> "1%"``, ``0.001 -> "0.1%"``: the suffix of the metric names."""
    return f"{max_fpr * 100:g}%"


def tpr_key(max_fpr: float) -> str:
    return f"tpr_at_fpr_{fpr_label(max_fpr)}"


def threshold_key(max_fpr: float) -> str:
    return f"threshold_at_fpr_{fpr_label(max_fpr)}"



def checked_arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got values {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return y, s


def equal_error_rate(y_true, y_score) -> tuple[float, float]:
    """``(eer, threshold)``: the rate where false positives equal false negatives (linearly
    interpolated between ROC points) and the score threshold (predict fake if ``score >= t``)
    at the ROC point where the false-positive rate first reaches the false-negative rate."""
    y, s = checked_arrays(y_true, y_score)
    fpr, tpr, thresholds = roc_curve(y, s)
    fnr = 1.0 - tpr
    gap = fpr - fnr  # rises from -1 to +1 along the curve
    i = int(np.argmax(gap >= 0))
    if i == 0 or gap[i] == 0:
        eer = float((fpr[i] + fnr[i]) / 2)
    else:  # the crossing lies between points i-1 and i
        w = gap[i] / (gap[i] - gap[i - 1])
        eer = float(fpr[i] - w * (fpr[i] - fpr[i - 1]))
    threshold = thresholds[i] if np.isfinite(thresholds[i]) else thresholds[min(i + 1, len(thresholds) - 1)]
    return eer, float(threshold)


def tpr_at_fpr(y_true, y_score, max_fpr: float) -> tuple[float, float]:
    """``(tpr, threshold)``: the highest true-positive rate of a threshold whose false-positive
    rate is at most ``max_fpr`` (predict fake if ``score >= threshold``), and a threshold that
    reaches it: halfway between the lowest score it flags and the next score down, the rule of
    ``dfd calibrate``'s target-FPR threshold. With fewer than ``1 / max_fpr`` reals no false
    positive is allowed: the TPR is then the share of fakes scored above every real. When not even
    that catches a fake, the TPR is 0 and the threshold lies above the top score."""
    y, s = checked_arrays(y_true, y_score)
    if not 0 <= max_fpr < 1:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    if np.unique(y).size < 2:
        raise ValueError("a TPR at a given FPR needs both reals and fakes")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    i = int(np.flatnonzero(fpr <= max_fpr + FPR_TOLERANCE)[-1])  # the TPR only grows along the curve
    if i == 0:  # even the top score is a real's: flag nothing
        top = s.max()
        return 0.0, float((top + 1.0) / 2 if top < 1 else np.nextafter(top, np.inf))
    # thresholds are the distinct scores, highest first: thresholds[i + 1] is the next one down
    return float(tpr[i]), float((thresholds[i] + thresholds[i + 1]) / 2)


def binary_metrics(y_true, y_score) -> dict:
    """AUC, average precision, EER and its threshold, TPR at an FPR of 1 % and 0.1 % and their
    thresholds (:func:`tpr_at_fpr`), accuracy at 0.5 and at the EER threshold (predict fake if
    ``score >= threshold``); ``reason`` explains NaNs (one class only) and is ``""`` otherwise."""
    y, s = checked_arrays(y_true, y_score)
    n_fake = int(y.sum())
    result = {
        "n": int(y.size),
        "n_real": int(y.size - n_fake),
        "n_fake": n_fake,
        "auc": math.nan,
        "ap": math.nan,
        "eer": math.nan,
        "eer_threshold": math.nan,
        "acc_at_0.5": float(((s >= 0.5) == y).mean()) if y.size else math.nan,
        "acc_at_eer": math.nan,
        **{key(max_fpr): math.nan for max_fpr in LOW_FPRS for key in (tpr_key, threshold_key)},
        "reason": "",
    }
    if y.size == 0:
        result["reason"] = "no samples"
        return result
    if n_fake == 0 or n_fake == y.size:
        result["reason"] = f"only one class present ({'all fake' if n_fake else 'all real'}): AUC, AP and EER need both"
        return result
    eer, eer_threshold = equal_error_rate(y, s)
    result.update(
        auc=float(roc_auc_score(y, s)),
        ap=float(average_precision_score(y, s)),
        eer=eer,
        eer_threshold=eer_threshold,
        acc_at_eer=float(((s >= eer_threshold) == y).mean()),
    )
    for max_fpr in LOW_FPRS:
        result[tpr_key(max_fpr)], result[threshold_key(max_fpr)] = tpr_at_fpr(y, s, max_fpr)
    return result


def roc_curve_points(y_true, y_score) -> pd.DataFrame:
    """The ROC curve as a table ``fpr, tpr, threshold`` (first row: threshold inf, (0, 0))."""
    y, s = checked_arrays(y_true, y_score)
    fpr, tpr, thresholds = roc_curve(y, s)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def per_group_metrics(table: pd.DataFrame, scores, by: str = "family", reals_with_every_group: bool = True,
                      bootstrap=None) -> pd.DataFrame:
    """One row of :func:`binary_metrics` per value of ``table[by]`` (``family``, ``cluster``,
    ``source`` ...), plus an ``(all)`` row; with ``bootstrap`` (a
    :class:`~dfd_lib.modeling.bootstrap.BootstrapConfig`) each row also holds its intervals.

    A group of fakes only (a fake family) cannot have an AUC on its own; with
    ``reals_with_every_group`` such a group is scored against all the reals of the table,
    the usual per-family protocol. ``mean_score`` is the group's own mean score."""
    if bootstrap is not None:
        from dfd_lib.modeling.bootstrap import metrics_with_intervals  # it builds on this module

        def measure(y, s):
            return metrics_with_intervals(y, s, bootstrap)
    else:
        measure = binary_metrics
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


def plot_roc_curves(curves: Mapping[str, tuple], path: str | os.PathLike | None = None, title: str = "ROC curves",
                    emphasis: Sequence[str] = (), bootstrap=None):
    """One figure with the ROC curve of each ``name -> (y_true, y_score)``, AUC in the legend;
    saved to ``path`` when given. Curves named in ``emphasis`` are drawn bold and the others
    thin and faded (many curves stay readable). With ``bootstrap`` (a
    :class:`~dfd_lib.modeling.bootstrap.BootstrapConfig`) the interval of the emphasised curves
    (of all without emphasis) is shaded and their AUC interval is in the legend. Returns the figure."""
    import matplotlib.pyplot as plt

    from dfd_lib.modeling import bootstrap as intervals  # it builds on this module

    banded = bootstrap is not None and bootstrap.enabled
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (y, s) in curves.items():
        metrics = binary_metrics(y, s)
        if math.isnan(metrics["auc"]):
            continue  # no curve for a single-class set
        points = roc_curve_points(y, s)
        style = {"lw": 1.8} if not emphasis else ({"lw": 2.6, "zorder": 3} if name in emphasis else {"lw": 1.0, "alpha": 0.6})
        label = f"{name} (AUC {metrics['auc']:.3f}"
        shade = banded and (not emphasis or name in emphasis)
        if shade:
            low, high = (intervals.intervals(y, s, bootstrap)[f"auc_{end}"] for end in ("lo", "hi"))
            label += f" [{low:.3f}, {high:.3f}]"
        (line,) = ax.plot(points["fpr"], points["tpr"], **style, label=label + ")")
        if shade:
            grid, low_tpr, high_tpr = intervals.roc_band(y, s, bootstrap)
            ax.fill_between(grid, low_tpr, high_tpr, step="post", color=line.get_color(), alpha=0.18, lw=0)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    handles, labels = ax.get_legend_handles_labels()
    if banded:
        from matplotlib.patches import Patch

        handles.append(Patch(color="grey", alpha=0.3, lw=0))
        labels.append(f"shaded: {bootstrap.confidence:.0%} bootstrap interval")
    ax.legend(handles, labels, loc="lower right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig
