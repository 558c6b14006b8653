"""Robustness: a detector's AUC on images unchanged and under JPEG compression, resizing (down and
back up) and Gaussian blur, with the kit's own degradation operations (:mod:`dfd_lib.synth.edits`);
notebook 04 scores the saved mixture this way."""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dfd_lib.core.figures import save_figure
from dfd_lib.core.logs import progress_bar
from dfd_lib.data.images import load_rgb
from dfd_lib.models.checkpoints import is_mixture_dir
from dfd_lib.scoring.expert_scores import experts_from_mixture, score_grouped
from dfd_lib.scoring.predictor import Predictor, auto_device
from dfd_lib.stats.bootstrap import BootstrapConfig, metrics_with_intervals
from dfd_lib.stats.metrics import LOW_FPRS, tpr_key
from dfd_lib.synth import edits

DEFAULT_PERTURBATIONS: dict[str, list[float]] = {"jpeg": [95, 75, 50, 30], "resize": [0.5, 0.25], "blur": [1, 2]}
RESULT_COLUMNS = ["perturbation", "level", "auc", "auc_lo", "auc_hi", "ap", *(tpr_key(m) for m in LOW_FPRS), "acc_at_0.5",
                  "n", "reason"]


def _degradations() -> dict[str, Callable[[Image.Image, float], Image.Image]]:
    """The kit's editing operations (the same ones the augmentation step uses)."""
    return {"jpeg": lambda image, quality: edits.jpeg(image, int(quality)), "resize": edits.resize, "blur": edits.blur}


def robustness_table(
    predict_fn: Callable[[list[Image.Image]], Sequence[float]],
    images: Sequence,
    labels: Sequence[int],
    perturbations: Mapping[str, Sequence[float]] | None = None,
    batch_size: int = 32,
    bootstrap: BootstrapConfig | None = None,
) -> pd.DataFrame:
    """AUC with its ``bootstrap`` interval (NaN without), AP, TPR at an FPR of 1 % and 0.1 % and
    accuracy of ``predict_fn`` on ``images`` unchanged and under each perturbation level: ``jpeg``
    quality, ``resize`` scale factor (down and back up, so detail is lost), ``blur`` Gaussian sigma
    (:mod:`dfd_lib.synth.edits`).

    ``predict_fn`` takes a list of PIL images and returns their fake-probabilities;
    ``images`` are PIL images or anything :func:`dfd_lib.data.images.load_rgb` reads."""
    perturbations = dict(DEFAULT_PERTURBATIONS if perturbations is None else perturbations)
    ops = _degradations()
    unknown = sorted(set(perturbations) - set(ops))
    if unknown:
        raise ValueError(f"unknown perturbations {unknown}; known: {sorted(ops)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    originals = [load_rgb(image) for image in images]
    settings = [("none", math.nan)] + [(name, float(level)) for name, levels in perturbations.items() for level in levels]
    rows = []
    for name, level in progress_bar(settings, desc="robustness", unit="setting"):
        scores: list[float] = []
        for start in range(0, len(originals), batch_size):
            batch = originals[start : start + batch_size]
            if name != "none":
                batch = [ops[name](image, level) for image in batch]
            scores.extend(float(v) for v in np.asarray(predict_fn(batch), dtype=np.float64).ravel())
        metrics = metrics_with_intervals(labels, scores, bootstrap or BootstrapConfig(bootstrap_resamples=0))
        rows.append({"perturbation": name, "level": level, **{k: metrics[k] for k in RESULT_COLUMNS[2:]}})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def plot_robustness(table: pd.DataFrame, path: str | os.PathLike | None = None, title: str = "Robustness"):
    """One panel per perturbation: AUC against its level (its interval shaded when the table has
    one), the unperturbed AUC dashed."""
    import matplotlib.pyplot as plt  # deferred: pyplot is slow to import

    kinds = [kind for kind in table["perturbation"].unique() if kind != "none"]
    clean = table.loc[table["perturbation"] == "none", "auc"]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(3.6 * max(1, len(kinds)), 3.4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = table[table["perturbation"] == kind]
        (line,) = ax.plot(rows["level"], rows["auc"], marker="o")
        if {"auc_lo", "auc_hi"} <= set(rows.columns) and rows["auc_lo"].notna().any():
            ax.fill_between(rows["level"], rows["auc_lo"], rows["auc_hi"], color=line.get_color(), alpha=0.18, lw=0,
                            label="bootstrap interval")
        if len(clean):
            ax.axhline(float(clean.iloc[0]), ls="--", c="grey", lw=1, label="unperturbed")
        if kind == "jpeg":
            ax.invert_xaxis()  # lower quality is the harder end, on the right as for the others
            ax.set_xlabel("JPEG quality")
        else:
            ax.set_xlabel({"resize": "scale factor", "blur": "Gaussian sigma"}.get(kind, "level"))
            if kind == "resize":
                ax.invert_xaxis()
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AUC")
    axes[0][0].legend(loc="lower left", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


@dataclass
class RobustnessResult:
    table: pd.DataFrame  # RESULT_COLUMNS: perturbation, level, auc and its interval, ap, TPRs, acc_at_0.5, n (empty when not run)
    figure: object | None  # the matplotlib figure (None when not run)
    images: int
    seconds: float


def mixture_robustness(
    weights_dir: str | os.PathLike,
    test: pd.DataFrame,
    levels: Mapping[str, Sequence[float]] | None = None,
    max_images: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    figure_path: str | os.PathLike | None = None,
    enabled: bool = True,
    bootstrap: BootstrapConfig | None = None,
) -> RobustnessResult:
    """AUC (with its ``bootstrap`` interval) of the saved mixture (loaded from ``weights_dir`` as
    ``dfd predict`` loads it) on the test images unchanged and under each perturbation level;
    ``max_images`` > 0 scores a sample of that many, stratified by label. ``enabled=False``
    returns an empty result."""
    if not enabled:
        empty = pd.DataFrame(columns=RESULT_COLUMNS)
        return RobustnessResult(table=empty, figure=None, images=0, seconds=0.0)
    started = time.perf_counter()
    rows = stratified_sample(test, max_images, seed)
    predict, experts = mixture_predict_fn(weights_dir, device, batch_size)
    table = robustness_table(predict, list(rows["path"]), rows["label"].astype(int).tolist(), levels, batch_size=batch_size,
                             bootstrap=bootstrap)
    figure = plot_robustness(table, figure_path, title=f"Mixture of {experts} experts: test AUC under degradations")
    return RobustnessResult(table=table, figure=figure, images=len(rows), seconds=time.perf_counter() - started)


def mixture_predict_fn(weights_dir: str | os.PathLike, device: str | None = None,
                       batch_size: int = 64) -> tuple[Callable[[list], list[float]], int]:
    """The saved mixture's fake-probability of a list of images (0.5 for an unreadable one) and its number of
    experts. On the CPU (a mixture in the kit's format) each (expert, image) pair is scored once in the process
    (:mod:`dfd_lib.scoring.expert_scores`: the unperturbed images the headline scored are not scored again);
    on a GPU (``device``, default: one when there is one) through the Predictor, as ``dfd predict`` loads it."""
    if (torch.device(device) if device is not None else auto_device()).type == "cpu" and is_mixture_dir(weights_dir):
        experts, preprocessings = experts_from_mixture(weights_dir)

        def predict(images):
            probs = score_grouped(experts, preprocessings, images, batch_size=batch_size).mean(axis=1)
            return [0.5 if np.isnan(p) else float(p) for p in probs]

        return predict, len(experts)
    predictor = Predictor.load(weights_dir, device=device, batch_size=batch_size, malloc_tuning=False)
    return (lambda images: [p.prob if p.ok else 0.5 for p in predictor.predict(images)]), predictor.num_experts


def stratified_sample(table: pd.DataFrame, max_rows: int, seed: int = 0) -> pd.DataFrame:
    """All of ``table`` when ``max_rows`` is 0 or not smaller, else about ``max_rows`` rows with
    the same share of each label."""
    if max_rows <= 0 or max_rows >= len(table):
        return table.reset_index(drop=True)
    fraction = max_rows / len(table)
    return table.groupby("label", group_keys=False).sample(frac=fraction, random_state=seed).reset_index(drop=True)
