"""Where was it edited, measured: pixel-level F1 and IoU of the mixture's localisation map against the
manipulation masks the kit's factory recorded (:mod:`dfd_lib.synth.masks`), per fake family.

Only fakes with a *partial* mask are scored: a mask that marks some pixels but not all (a splice, a
coloured background, a self-blend, an inpainting). A whole-image mask (img2img, a fully generated image)
would make any map that calls everything edited perfect, and a real has no mask at all, so neither says
anything about *where*. Each image's map (:meth:`~dfd_lib.scoring.predictor.Predictor.predict_maps`, at
the image's own resolution) is thresholded at 0.5 and compared with its mask: F1 = 2|P∩T| / (|P| + |T|),
IoU = |P∩T| / |P∪T| (both 0 when the map marks nothing, since the mask marks something). A family's figure
is the mean over its images, with a percentile bootstrap interval over the images
(:func:`dfd_lib.stats.bootstrap.mean_interval`). These figures sit beside the image-level headline, they
do not replace it; on the demo the fakes and their masks are the kit's own, so a good score says the
heads learned where the kit's own edits were, not where a real forger's were.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dfd_lib.core.figures import save_figure
from dfd_lib.data.images import ImageLoadError, load_rgb
from dfd_lib.data.manifest import FAKE, MASK
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.stats.bootstrap import BootstrapConfig, mean_interval

THRESHOLD = 0.5  # a map's value from which a pixel counts as edited
SCORE_COLUMNS = ["path", "family", "f1", "iou", "mask_share", "predicted_share"]
SUMMARY_COLUMNS = ["family", "n", "f1", "f1_lo", "f1_hi", "iou", "iou_lo", "iou_hi"]
ALL_FAMILIES = "all"


def pixel_scores(predicted: np.ndarray, truth: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """F1 and IoU of ``predicted`` (a map in [0, 1], edited from ``threshold``) against ``truth`` (a mask,
    > 0 = edited), two arrays of one shape. A pair with nothing marked in both scores 1 (they agree)."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"a map of shape {predicted.shape} against a mask of shape {truth.shape}")
    p, t = predicted >= threshold, truth > 0
    both, either = int((p & t).sum()), int((p | t).sum())
    if either == 0:
        return {"f1": 1.0, "iou": 1.0}
    return {"f1": 2 * both / (int(p.sum()) + int(t.sum())), "iou": both / either}


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as an HxW bool array (True = edited)."""
    return np.asarray(load_rgb(path))[..., 0] > 0


def _has_mask(value) -> bool:
    return isinstance(value, str) and value != ""


def partial_mask_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The fakes of ``table`` whose mask is partial (some pixels edited, not all), with their ``mask_share``;
    unreadable masks are left out."""
    if MASK not in table.columns:
        return table.iloc[:0].assign(mask_share=pd.Series(dtype=float))
    fakes = table[(table["label"].astype(int) == FAKE) & table[MASK].map(_has_mask)]
    shares = {}
    for index, path in fakes[MASK].items():
        try:
            shares[index] = float(read_mask(path).mean())
        except ImageLoadError:
            continue
    kept = fakes.loc[[i for i, share in shares.items() if 0.0 < share < 1.0]]
    return kept.assign(mask_share=[shares[i] for i in kept.index])


def localisation_scores(predictor: Predictor, rows: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """One row per image of ``rows`` (from :func:`partial_mask_rows`): its pixel F1 and IoU, its mask's and its
    map's share of edited pixels (:data:`SCORE_COLUMNS`); unreadable images are left out."""
    records = []
    for (_, row), predicted in zip(rows.iterrows(), predictor.predict_maps(list(rows["path"]))):
        if predicted is None:
            continue
        scores = pixel_scores(predicted, read_mask(row[MASK]), threshold)
        records.append({"path": row["path"], "family": row.get("family", ""), **scores,
                        "mask_share": float(row["mask_share"]), "predicted_share": float((predicted >= threshold).mean())})
    return pd.DataFrame(records, columns=SCORE_COLUMNS)


def localisation_summary(scores: pd.DataFrame, bootstrap: BootstrapConfig) -> pd.DataFrame:
    """Per family (and :data:`ALL_FAMILIES` together): the number of images, mean pixel F1 and IoU with their
    bootstrap intervals over the images (:data:`SUMMARY_COLUMNS`)."""
    groups = [(str(family), part) for family, part in scores.groupby("family", sort=True)]
    rows = []
    for family, part in [*groups, (ALL_FAMILIES, scores)]:
        row = {"family": family, "n": len(part)}
        for metric in ("f1", "iou"):
            values = part[metric].to_numpy(dtype=float)
            row[metric] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_lo"], row[f"{metric}_hi"] = mean_interval(values, bootstrap)
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


@dataclass
class LocalisationResult:
    """Notebook 04's localisation figures: per image, per family, and why there are none when there are none."""

    scores: pd.DataFrame
    summary: pd.DataFrame
    note: str


def mixture_localisation(weights_dir: str | os.PathLike, test: pd.DataFrame, bootstrap: BootstrapConfig,
                         threshold: float = THRESHOLD) -> LocalisationResult:
    """The saved mixture's maps on the test split's fakes with partial masks, scored (see the module)."""
    predictor = Predictor.load(weights_dir, device="cpu")
    empty = LocalisationResult(pd.DataFrame(columns=SCORE_COLUMNS), pd.DataFrame(columns=SUMMARY_COLUMNS), "")
    if not predictor.has_maps:
        empty.note = "no localisation heads (mask_weight 0): pixel-level figures need a mixture trained with mask_weight > 0"
        return empty
    rows = partial_mask_rows(test)
    if rows.empty:
        empty.note = "the test split has no fakes with a partial mask: nothing to localise"
        return empty
    scores = localisation_scores(predictor, rows, threshold)
    note = (f"{len(scores)} test fakes with a partial mask, map thresholded at {threshold}; "
            f"intervals: {bootstrap.confidence:.0%} bootstrap over the images")
    return LocalisationResult(scores, localisation_summary(scores, bootstrap), note)


def plot_mask_grid(weights_dir: str | os.PathLike, scores: pd.DataFrame, test: pd.DataFrame, path=None,
                   per_family: int = 2, families: Sequence[str] | None = None):
    """A grid of test fakes: the image, its true mask and the mixture's map, ``per_family`` images of each family
    (the first ones of ``scores``); saved to ``path``. Returns the figure (None when there is nothing to show)."""
    import matplotlib.pyplot as plt  # deferred: matplotlib is heavy and only the figure needs it

    chosen = scores if families is None else scores[scores["family"].isin(families)]
    chosen = chosen.groupby("family", sort=True).head(per_family)
    if chosen.empty:
        return None
    predictor = Predictor.load(weights_dir, device="cpu")
    masks = test.set_index("path")[MASK]
    maps = predictor.predict_maps(list(chosen["path"]))
    fig, axes = plt.subplots(len(chosen), 3, figsize=(6.6, 2.2 * len(chosen)), squeeze=False)
    for ax_row, (_, row), predicted in zip(axes, chosen.iterrows(), maps):
        panels = [(np.asarray(load_rgb(row["path"])), f"{row['family']}"), (read_mask(masks[row["path"]]), "true mask"),
                  (predicted, f"map: F1 {row['f1']:.2f} IoU {row['iou']:.2f}")]
        for ax, (image, title) in zip(ax_row, panels):
            ax.imshow(image, cmap=None if image.ndim == 3 else "gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    return fig
