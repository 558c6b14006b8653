"""The ROC figure of several models, with bootstrap bands (:mod:`dfd_lib.stats.bootstrap`)."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from dfd_lib.core.figures import save_figure
from dfd_lib.stats.bootstrap import intervals, roc_band
from dfd_lib.stats.metrics import binary_metrics, roc_curve_points


def plot_roc_curves(curves: Mapping[str, tuple], path: str | os.PathLike | None = None, title: str = "ROC curves",
                    emphasis: Sequence[str] = (), bootstrap=None):
    """One figure with the ROC curve of each ``name -> (y_true, y_score)``, AUC in the legend;
    saved to ``path`` when given. Curves named in ``emphasis`` are drawn bold and the others
    thin and faded (many curves stay readable). With ``bootstrap`` (a
    :class:`~dfd_lib.stats.bootstrap.BootstrapConfig`) the interval of the emphasised curves
    (of all without emphasis) is shaded and their AUC interval is in the legend. Returns the figure."""
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
            low, high = (intervals(y, s, bootstrap)[f"auc_{end}"] for end in ("lo", "hi"))
            label += f" [{low:.3f}, {high:.3f}]"
        (line,) = ax.plot(points["fpr"], points["tpr"], **style, label=label + ")")
        if shade:
            grid, low_tpr, high_tpr = roc_band(y, s, bootstrap)
            ax.fill_between(grid, low_tpr, high_tpr, step="post", color=line.get_color(), alpha=0.18, lw=0)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    handles, labels = ax.get_legend_handles_labels()
    if banded:
        handles.append(Patch(color="grey", alpha=0.3, lw=0))
        labels.append(f"shaded: {bootstrap.confidence:.0%} bootstrap interval")
    ax.legend(handles, labels, loc="lower right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig
