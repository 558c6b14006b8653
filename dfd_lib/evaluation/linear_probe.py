"""The baseline a user tries first: a linear probe, a logistic regression on the frozen backbone
embeddings notebook 01 computed (the run's ``embeddings/``). No backbone is trained.

The probe standardises the features (mean and scale of the official ``train`` rows), fits a
scikit-learn :class:`~sklearn.linear_model.LogisticRegression` (L2, lbfgs) on the official ``train``
rows once for every inverse regularisation strength ``C`` of :class:`LinearProbeConfig`, and keeps the
``C`` with the highest AUC on the official ``val`` rows (a tie goes to the smaller ``C``, the stronger
regularisation); a grid of one value is a fixed ``C``. Nothing in it is random: the same embeddings
give the same scores.

It sees the manifest's images only: notebook 03's augmented images have no embedding, so they are in
neither its training nor its validation rows (the trained models see them). A test image without an
embedding (one notebook 01 could not decode) gets the score 0.5, no evidence either way, and the
headline's note counts it. The headline comparison puts the probe first
(:func:`dfd_lib.evaluation.comparison.headline_comparison`); the per-family table and the ladder's
rung 0 (:mod:`dfd_lib.evaluation.ladder_results`) take its scores from there.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from dfd_lib.core import runs
from dfd_lib.core.config import StepConfig, check_fields, is_number
from dfd_lib.data.manifest import TRAIN, VAL
from dfd_lib.embed.embedding_store import load_run_embeddings

MAX_ITER = 5000  # lbfgs iterations per fit; the grid table says whether each fit converged
MISSING_SCORE = 0.5  # the probe's score of a test image without an embedding


def _default_grid() -> list[float]:
    return [0.001, 0.01, 0.1, 1.0, 10.0]


@dataclass
class LinearProbeConfig(StepConfig):
    """The linear-probe baseline of notebook 04."""

    run_probe: bool = True  # fit the linear-probe baseline on notebook 01's embeddings (headline row, ladder rung 0)
    # C values tried for the probe, the best on official val kept (one value: a fixed C)
    probe_c_grid: list[float] = field(default_factory=_default_grid)

    def __post_init__(self) -> None:
        grid = self.probe_c_grid
        check_fields(self, [
            ("run_probe", isinstance(self.run_probe, bool), "true or false"),
            ("probe_c_grid", isinstance(grid, (list, tuple)) and len(grid) >= 1
             and all(is_number(c) and c > 0 for c in grid), "a non-empty list of numbers > 0"),
        ])


@dataclass
class LinearProbe:
    """A fitted probe: its chosen ``C``, the grid it was chosen from, and its score of every embedded image."""

    backbone: str  # the frozen backbone whose embeddings it reads
    c: float  # the chosen inverse regularisation strength
    val_auc: float  # its AUC on the official val rows
    grid: pd.DataFrame  # one row per C tried: val AUC, lbfgs iterations, converged, chosen
    scores: pd.Series  # fake-probability of every embedded image, indexed by path
    n_train: int
    n_val: int

    @property
    def name(self) -> str:
        return f"linear probe on frozen {self.backbone} features"

    def scores_of(self, rows: pd.DataFrame) -> tuple[np.ndarray, int]:
        """The probe's fake-probabilities of ``rows`` (a table with ``path``), in their order, and how many
        of them had no embedding (scored :data:`MISSING_SCORE`)."""
        found = rows["path"].astype(str).map(self.scores)
        return found.fillna(MISSING_SCORE).to_numpy(dtype=np.float64), int(found.isna().sum())

    def note(self, missing: int) -> str:
        """What the probe's row is, for the headline's note."""
        text = (f"{self.name}: standardised features, logistic regression (C={self.c:g}, chosen on the official val "
                f"split from {len(self.grid)} value(s), val AUC {self.val_auc:.4f}), fit on the {self.n_train} official "
                f"train images; notebook 03's augmented images have no embedding and are not in its training set")
        if missing:
            return text + f"; {missing} test image(s) without an embedding are scored {MISSING_SCORE} by the probe"
        return text + "; every test image has an embedding"


def fit_linear_probe(embeddings: np.ndarray, table: pd.DataFrame, config: LinearProbeConfig | None = None,
                     backbone: str = "backbone") -> LinearProbe:
    """The probe fit on the rows of ``table`` (``path``, ``split``, ``label``; row ``i`` is
    ``embeddings[i]``) whose split is train, its ``C`` chosen on those whose split is val."""
    config = config or LinearProbeConfig()
    features = np.asarray(embeddings, dtype=np.float64)
    if len(features) != len(table):
        raise ValueError(f"{len(features)} embeddings for {len(table)} rows")
    split = table["split"].astype(str).to_numpy()
    labels = table["label"].to_numpy().astype(int)
    train, val = split == TRAIN, split == VAL
    for name, mask in (("train", train), ("val", val)):
        if np.unique(labels[mask]).size != 2:
            raise ValueError(f"the linear probe needs reals and fakes among the official {name} rows")
    fits, rows = [], []
    for c in sorted(float(c) for c in config.probe_c_grid):
        model = _fit(features[train], labels[train], c)
        iterations = int(model[-1].n_iter_.max())
        val_auc = _auc(labels[val], model.predict_proba(features[val])[:, 1])
        fits.append(model)
        rows.append({"C": c, "val_auc": val_auc, "iterations": iterations, "converged": iterations < MAX_ITER})
    grid = pd.DataFrame(rows)
    best = int(np.argmax(grid["val_auc"].to_numpy()))  # the first maximum: the smallest C among ties
    grid["chosen"] = grid.index == best
    scores = pd.Series(fits[best].predict_proba(features)[:, 1], index=table["path"].astype(str).to_numpy())
    scores = scores[~scores.index.duplicated()]  # one image listed twice has one embedding's score
    return LinearProbe(backbone=backbone, c=float(grid.loc[best, "C"]), val_auc=float(grid.loc[best, "val_auc"]),
                       grid=grid.set_index("C"), scores=scores, n_train=int(train.sum()), n_val=int(val.sum()))


def fit_run_probe(run: runs.RunDir, config: LinearProbeConfig) -> LinearProbe | None:
    """The probe on the embeddings notebook 01 made for ``run``; None when ``config`` switches it off."""
    if not config.run_probe:
        return None
    embedded = load_run_embeddings(run)
    index = json.loads(run.require(runs.EMBEDDINGS_INDEX).read_text())
    backbone = str(index.get("config", {}).get("backbone", "backbone"))
    return fit_linear_probe(embedded.embeddings, embedded.table, config, backbone)


def probe_table(probe: LinearProbe | None) -> pd.DataFrame:
    """The probe's grid (one row per C: val AUC, iterations, converged, chosen); empty without a probe."""
    if probe is None:
        return pd.DataFrame(columns=["val_auc", "iterations", "converged", "chosen"], index=pd.Index([], name="C"))
    return probe.grid


def _fit(features: np.ndarray, labels: np.ndarray, c: float) -> Pipeline:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded in the grid table instead
        return model.fit(features, labels)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))
