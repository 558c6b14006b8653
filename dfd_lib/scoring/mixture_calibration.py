"""Calibrating a mixture end to end (notebook 04, ``dfd calibrate``): score labelled rows (or take
their scores), choose the threshold with :mod:`dfd_lib.scoring.calibration`'s rules, check it on a test
set, store it in the mixture's ``config.json`` and draw its figures."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dfd_lib.data.manifest import FAKE, REAL, VAL
from dfd_lib.data.resplit_table import resplit_column, resplit_indices
from dfd_lib.models.checkpoints import is_mixture_dir
from dfd_lib.scoring.calibration import (
    DEFAULT_TARGET_FPR,
    Calibration,
    calibrate_scores,
    check_rates,
    dataset_fingerprint,
    write_calibration,
)
from dfd_lib.scoring.calibration_plots import plot_calibration
from dfd_lib.scoring.expert_scores import mixture_scores
from dfd_lib.scoring.folders import score_paths
from dfd_lib.scoring.predictor import Predictor, auto_device

log = logging.getLogger(__name__)


def selection_rows(table: pd.DataFrame, resplits: Sequence[int] | None = None) -> pd.DataFrame:
    """The rows an expert was selected on: those on the ``val`` side (the held-out cluster) of
    any of ``resplits`` (default: every ``resplit_<i>`` column). Never the test split."""
    chosen = resplit_indices(table) if resplits is None else list(resplits)
    if not chosen:
        raise ValueError("the table has no resplit_<i> columns: give rows with re-splits (notebook 02's resplits.csv)")
    held_out = np.zeros(len(table), dtype=bool)
    for i in chosen:
        held_out |= (table[resplit_column(i)] == VAL).to_numpy()
    return table[held_out & (table["split"].astype(str) != "test").to_numpy()]


def scored_labels(table: pd.DataFrame, predictor=None, progress: bool = True) -> pd.DataFrame:
    """``table`` with a ``prob_fake`` column: taken as is when present, else scored with
    ``predictor`` (a :class:`~dfd_lib.scoring.predictor.Predictor`); unreadable or unlabelled rows dropped."""
    if "prob_fake" not in table:
        if predictor is None:
            raise ValueError("the table has no prob_fake column: give a predictor to score its images")
        scored = score_paths(predictor, table["path"], labels=table["label"].astype(float), progress=progress)
        table = table.reset_index(drop=True).assign(prob_fake=scored["prob_fake"], error=scored["error"])
    keep = table["prob_fake"].notna() & table["label"].isin([REAL, FAKE])
    if not keep.all():
        log.warning("%d of %d images left out: unreadable or unlabelled", int((~keep).sum()), len(table))
    return table[keep]


def with_mixture_scores(table, weights_dir: str | os.PathLike, batch_size: int = 32, progress: bool = True):
    """``table`` (a DataFrame of ``path`` and ``label``) with the ``prob_fake`` of the mixture in ``weights_dir``
    (:func:`~dfd_lib.scoring.expert_scores.mixture_scores`: scores the process computed already are reused) and an
    ``error`` for the unreadable images; anything else (scored already, ``(labels, scores)``, None) as it is."""
    if not isinstance(table, pd.DataFrame) or "prob_fake" in table:
        return table
    probs = mixture_scores(weights_dir, [str(p) for p in table["path"]], batch_size=batch_size, progress=progress)
    return table.reset_index(drop=True).assign(prob_fake=probs, error=np.where(np.isnan(probs), "unreadable image", ""))


def calibrate_mixture(weights_dir: str | os.PathLike, table: pd.DataFrame, target_fpr: float = DEFAULT_TARGET_FPR,
                      rule: str = "fpr", data: str = "", check=None, check_data: str = "",
                      figures_dir: str | os.PathLike | None = None, figure_prefix: str = "calibration",
                      predictor=None, batch_size: int = 32, progress: bool = True) -> Calibration:
    """Choose the threshold on ``table`` (``path`` and ``label``; with a ``prob_fake`` column its
    scores are used as they are, so nothing is scored twice; else ``predictor`` or the mixture
    scores it) and store it in ``weights_dir``'s ``config.json``. ``check``: a labelled test set
    (a table like ``table``, or ``(labels, scores)``) whose rates at the threshold are stored
    beside the target. With ``figures_dir``, the ROC and the reliability diagram are drawn there
    (``<figure_prefix>_roc.png``, ``<figure_prefix>_reliability.png``)."""
    if predictor is None and auto_device().type == "cpu" and is_mixture_dir(weights_dir):  # each image once per expert
        table, check = (with_mixture_scores(t, weights_dir, batch_size, progress) for t in (table, check))
    if predictor is None and any(isinstance(t, pd.DataFrame) and "prob_fake" not in t for t in (table, check)):
        predictor = Predictor.load(weights_dir, batch_size=batch_size, malloc_tuning=False)
    rows = scored_labels(table, predictor, progress)
    calibration = calibrate_scores(rows["label"], rows["prob_fake"], rule, target_fpr,
                                   data=data or f"{len(rows)} labelled images", data_hash=dataset_fingerprint(rows))
    if check is not None:
        if isinstance(check, pd.DataFrame):
            check = scored_labels(check, predictor, progress)
            check = (check["label"], check["prob_fake"])
        calibration.check = check_rates(calibration, *check, data=check_data or "check set")
    write_calibration(weights_dir, calibration)
    if figures_dir is not None:
        plot_calibration(rows["label"], rows["prob_fake"], calibration, Path(figures_dir), figure_prefix)
    return calibration


def summary_table(calibration: Calibration) -> pd.DataFrame:
    """The calibration data's rates, and the check set's beside them, for a notebook or a terminal."""
    rows = [{"data": calibration.data, "role": "calibration", "target_fpr": calibration.target_fpr,
             "threshold": calibration.threshold, "fpr": calibration.fpr, "tpr": calibration.tpr,
             "n_real": calibration.n_real, "n_fake": calibration.n_fake}]
    if calibration.check:
        check = calibration.check
        rows.append({"data": check["data"], "role": "check", "target_fpr": calibration.target_fpr,
                     "threshold": calibration.threshold, "fpr": check["fpr"], "tpr": check["tpr"],
                     "n_real": check["n_real"], "n_fake": check["n_fake"]})
    return pd.DataFrame(rows).set_index("role")
