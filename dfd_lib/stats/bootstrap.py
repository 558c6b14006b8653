"""Intervals for the figures of a test split: a stratified, seeded bootstrap of its images.

Each resample draws with replacement as many reals from the reals, and as many fakes from the
fakes, as the set holds (stratified: the class counts stay fixed, so every resample has an AUC).
A resample is a vector of counts, how often each image was drawn; the ROC curves of all the
resamples at once are cumulative sums of those counts over the images sorted by score, so 1,000
resamples of a few hundred images cost milliseconds. Intervals are percentile intervals at
``confidence`` (95 % by default). A *paired* bootstrap scores two models on the same resamples:
the interval of their difference says whether one beats the other on this test split (it says
nothing about another training run: repeated seeds answer that, :mod:`dfd_lib.evaluation.ladder`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dfd_lib.core.config import StepConfig
from dfd_lib.stats.metrics import FPR_TOLERANCE, LOW_FPRS, binary_metrics, checked_arrays, tpr_key

INTERVAL_METRICS = ("auc", "ap", "eer", *(tpr_key(max_fpr) for max_fpr in LOW_FPRS))
LOWER_IS_BETTER = {"eer"}
BETTER, WORSE, UNCLEAR = "better", "worse", "no clear difference"


@dataclass
class BootstrapConfig(StepConfig):
    """How the intervals of notebook 04's test-split figures are drawn."""

    bootstrap_resamples: int = 1000  # stratified bootstrap resamples of the test split for every interval, 0 for none
    confidence: float = 0.95  # level of every interval (percentile bootstrap)
    seed: int = 0  # seed of the resamples (and of everything else the notebook draws)

    def __post_init__(self):
        resamples = self.bootstrap_resamples
        if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 0:
            raise ValueError(f"BootstrapConfig.bootstrap_resamples must be an int >= 0 (0 = no intervals), got {resamples!r}")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or not 0 < self.confidence < 1:
            raise ValueError(f"BootstrapConfig.confidence must be in (0, 1), got {self.confidence!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"BootstrapConfig.seed must be an int, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        return self.bootstrap_resamples > 0

    @property
    def quantiles(self) -> tuple[float, float]:
        tail = (1 - self.confidence) / 2
        return tail, 1 - tail


def resample_counts(labels, n_resamples: int, seed: int = 0) -> np.ndarray:
    """``(n_resamples, n)`` counts: how often each of the ``n`` items is drawn in each stratified
    resample (each class resampled within itself, so every row holds each class's own count)."""
    labels = np.asarray(labels).astype(int).ravel()
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, labels.size))
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        if members.size:
            counts[:, members] = rng.multinomial(members.size, np.full(members.size, 1 / members.size), size=n_resamples)
    return counts


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray):
    """True and false positives of every weighted set at each distinct threshold, highest first,
    after a leading zero column (threshold above every score); and those thresholds."""
    order = np.argsort(-scores, kind="mergesort")
    ordered, fake = scores[order], labels[order].astype(bool)
    weights = counts[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]  # one group per distinct score (ties together)
    tp = np.cumsum(np.add.reduceat(np.where(fake, weights, 0.0), starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(np.where(fake, 0.0, weights), starts, axis=1), axis=1)
    zeros = np.zeros((counts.shape[0], 1))
    return np.hstack([zeros, tp]), np.hstack([zeros, fp]), ordered[starts]


def curve_metrics(labels, scores, counts) -> dict[str, np.ndarray]:
    """:data:`INTERVAL_METRICS` of every row of ``counts`` (``(B, n)`` item weights, e.g. from
    :func:`resample_counts`), computed as :func:`dfd_lib.stats.metrics.binary_metrics` computes
    them: with a row of ones they are its values."""
    y, s = checked_arrays(labels, scores)
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    if counts.shape[1] != y.size:
        raise ValueError(f"counts for {counts.shape[1]} items but {y.size} scores")
    tp, fp, _ = _cumulative_counts(y, s, counts)
    tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    values = {
        "auc": np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1),  # trapezoids: ties count half
        "ap": np.sum(np.diff(tpr, axis=1) * precision[:, 1:], axis=1),  # scikit-learn's step-wise average precision
        "eer": _equal_error_rates(fpr, tpr),
    }
    for max_fpr in LOW_FPRS:
        last = (fpr <= max_fpr + FPR_TOLERANCE).sum(axis=1) - 1  # the FPR only grows along the curve
        values[tpr_key(max_fpr)] = tpr[np.arange(len(tpr)), last]
    return values


def _equal_error_rates(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Where FPR meets FNR, interpolated linearly between ROC points (as :func:`~dfd_lib.stats.metrics.equal_error_rate`)."""
    gap = fpr - (1 - tpr)  # from -1 at the top threshold to +1 below every score
    rows = np.arange(len(gap))
    i = np.argmax(gap >= 0, axis=1)
    after, before = gap[rows, i], gap[rows, i - 1]
    share = np.divide(after, after - before, out=np.zeros_like(after), where=after > 0)
    return fpr[rows, i] - share * (fpr[rows, i] - fpr[rows, i - 1])


def _both_classes(labels) -> bool:
    return np.unique(np.asarray(labels).astype(int)).size == 2


def intervals(labels, scores, config: BootstrapConfig) -> dict[str, float]:
    """``{metric}_lo`` and ``{metric}_hi`` for each of :data:`INTERVAL_METRICS`: the percentile
    interval over ``config.bootstrap_resamples`` stratified resamples (NaN when the bootstrap is
    off or the set holds one class)."""
    keys = [f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi")]
    if not config.enabled or not _both_classes(labels):
        return dict.fromkeys(keys, math.nan)
    values = curve_metrics(labels, scores, resample_counts(labels, config.bootstrap_resamples, config.seed))
    result = {}
    for metric in INTERVAL_METRICS:
        low, high = np.quantile(values[metric], config.quantiles)
        result[f"{metric}_lo"], result[f"{metric}_hi"] = float(low), float(high)
    return result


def metrics_with_intervals(labels, scores, config: BootstrapConfig) -> dict:
    """:func:`~dfd_lib.stats.metrics.binary_metrics` plus :func:`intervals`."""
    return {**binary_metrics(labels, scores), **intervals(labels, scores, config)}


def paired_bootstrap(labels, scores_a, scores_b, config: BootstrapConfig, metric: str = "auc") -> dict:
    """Does model a beat model b on ``metric``? Both are scored on the same resamples: ``delta``
    (a minus b on the whole set), its interval, the share of resamples where a does not beat b, the
    two-sided bootstrap ``p_value`` of "no difference" (twice the smaller tail's share of resamples on
    or past zero, counted as (k + 1) / (B + 1) so that it is never 0), and a ``verdict`` for this one
    comparison: :data:`BETTER` when the interval lies wholly on a's side, :data:`WORSE` when wholly on
    b's, else :data:`UNCLEAR` (for ``eer`` lower is better). Several verdicts on one test split need a
    correction (:mod:`dfd_lib.stats.multiple_testing`)."""
    if metric not in INTERVAL_METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {INTERVAL_METRICS}")
    point = binary_metrics(labels, scores_a)[metric] - binary_metrics(labels, scores_b)[metric]
    result = {"delta": float(point), "delta_lo": math.nan, "delta_hi": math.nan, "share_not_better": math.nan,
              "p_value": math.nan, "verdict": ""}
    if not config.enabled or not _both_classes(labels):
        return result
    counts = resample_counts(labels, config.bootstrap_resamples, config.seed)
    delta = curve_metrics(labels, scores_a, counts)[metric] - curve_metrics(labels, scores_b, counts)[metric]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    low, high = np.quantile(delta, config.quantiles)
    verdict = BETTER if sign * low > 0 and sign * high > 0 else WORSE if sign * low < 0 and sign * high < 0 else UNCLEAR
    tail = min(int(np.sum(delta <= 0)), int(np.sum(delta >= 0)))
    p_value = min(1.0, 2 * (tail + 1) / (delta.size + 1))
    result.update(delta_lo=float(low), delta_hi=float(high), share_not_better=float(np.mean(sign * delta <= 0)),
                  p_value=p_value, verdict=verdict)
    return result


def roc_band(labels, scores, config: BootstrapConfig, grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr grid, low, high)``: the interval of the TPR reached at each FPR of ``grid`` (the best
    TPR whose FPR is at most that), over the resamples; for shading a ROC curve."""
    y, s = checked_arrays(labels, scores)
    grid = np.linspace(0, 1, 201) if grid is None else np.asarray(grid, dtype=np.float64)
    tp, fp, _ = _cumulative_counts(y, s, resample_counts(y, config.bootstrap_resamples, config.seed))
    tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    reached = np.empty((len(tpr), grid.size))
    for row in range(len(tpr)):
        reached[row] = tpr[row, np.searchsorted(fpr[row], grid + FPR_TOLERANCE, side="right") - 1]
    low, high = np.quantile(reached, config.quantiles, axis=0)
    return grid, low, high


def mean_interval(values, config: BootstrapConfig) -> tuple[float, float]:
    """The percentile interval of the mean of ``values`` (per-item scores, e.g. each image's pixel F1) over
    ``config.bootstrap_resamples`` resamples of the items; NaNs when the bootstrap is off or there are none."""
    values = np.asarray(values, dtype=float).ravel()
    if not config.enabled or values.size == 0:
        return math.nan, math.nan
    counts = resample_counts(np.ones(values.size, dtype=int), config.bootstrap_resamples, config.seed)
    low, high = np.quantile(counts @ values / values.size, config.quantiles)
    return float(low), float(high)
