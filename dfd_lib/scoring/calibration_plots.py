"""The figures of a calibration (:mod:`dfd_lib.scoring.calibration`): the ROC curve with the
chosen point, on a linear and a logarithmic false-positive axis (a 1 % target lives at the left
edge of a linear plot), and the reliability diagram (fraction of fakes per score bin against the
mean score, :func:`sklearn.calibration.calibration_curve`) with the score histogram below it."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from dfd_lib.core.figures import save_figure
from dfd_lib.data.manifest import FAKE, REAL


def plot_roc_with_threshold(labels, scores, calibration, path: str | Path | None = None):
    """ROC curve (linear and log FPR) with the calibrated point and the target rate marked."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    fpr, tpr, _ = roc_curve(y, s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    floor = 0.5 / max(1, int((y == REAL).sum()))  # one false positive in two calibration reals' worth: log axis floor
    for ax, log in zip(axes, (False, True)):
        ax.plot(np.maximum(fpr, floor) if log else fpr, tpr, lw=1.8, label=f"ROC (AUC {calibration.auc:.3f})")
        ax.plot(max(calibration.fpr, floor) if log else calibration.fpr, calibration.tpr, "o", ms=8, color="#c62828",
                label=f"threshold {calibration.threshold:.4f}: FPR {calibration.fpr:.4f}, TPR {calibration.tpr:.4f}")
        if calibration.target_fpr is not None:
            ax.axvline(max(calibration.target_fpr, floor) if log else calibration.target_fpr, color="grey", ls="--",
                       lw=1, label=f"target FPR {calibration.target_fpr:g}")
        if calibration.check:
            check = calibration.check
            ax.plot(max(check["fpr"], floor) if log else check["fpr"], check["tpr"], "s", ms=7, color="#6a1b9a",
                    label=f"{check['data']}: FPR {check['fpr']:.4f}, TPR {check['tpr']:.4f}")
        ax.set(xlabel="false positive rate" + (" (log)" if log else ""), ylabel="true positive rate", ylim=(0, 1.02))
        if log:
            ax.set_xscale("log")
            ax.set_xlim(floor, 1)
        else:
            ax.set_xlim(0, 1)
            ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.suptitle(f"Calibration on {calibration.data} ({calibration.n_real} real, {calibration.n_fake} fake)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def plot_reliability(labels, scores, calibration, path: str | Path | None = None, bins: int = 10):
    """Fraction of fakes per score bin against the bin's mean score (the diagonal is a calibrated
    probability), and how many images each bin holds, with the threshold drawn."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    frac_fake, mean_score = calibration_curve(y, s, n_bins=bins, strategy="uniform")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], ls=":", c="grey", lw=1, label="perfectly calibrated")
    top.plot(mean_score, frac_fake, "o-", lw=1.8, label="mixture")
    top.axvline(calibration.threshold, color="black", ls="--", lw=1, label=f"threshold {calibration.threshold:.4f}")
    top.set(ylabel="fraction of fakes", ylim=(-0.02, 1.02),
            title=f"Reliability on {calibration.data}\n(fake share {calibration.n_fake / max(1, len(y)):.2f}; a probability, "
                  "not a verdict)")
    top.legend(loc="upper left", fontsize="small")
    edges = np.linspace(0, 1, bins + 1)
    bottom.hist([s[y == REAL], s[y == FAKE]], bins=edges, stacked=True, color=["#2e7d32", "#c62828"],
                label=["real", "fake"])
    bottom.axvline(calibration.threshold, color="black", ls="--", lw=1)
    bottom.set(xlabel="fake probability (mixture)", ylabel="images", xlim=(0, 1))
    bottom.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def plot_calibration(labels, scores, calibration, directory: str | Path, prefix: str = "calibration") -> list[Path]:
    """Both figures as ``<prefix>_roc.png`` and ``<prefix>_reliability.png`` in ``directory``."""
    directory = Path(directory)
    paths = [directory / f"{prefix}_roc.png", directory / f"{prefix}_reliability.png"]
    plot_roc_with_threshold(labels, scores, calibration, paths[0])
    plot_reliability(labels, scores, calibration, paths[1])
    return paths
