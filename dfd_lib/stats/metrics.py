"""Scoring a detector: AUC, average precision, EER, TPR at a low false-positive rate (1 % and
0.1 %) with the threshold it implies, accuracy; ROC curve points. Intervals are
:mod:`dfd_lib.stats.bootstrap`, per-family and per-cluster tables :mod:`dfd_lib.stats.group_metrics`,
the ROC figure :mod:`dfd_lib.stats.roc_plot`.

Scores are fake-probabilities (label 1 = fake). Metrics that need both classes are NaN, with
the reason in ``reason``, when a set holds only one class.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

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
