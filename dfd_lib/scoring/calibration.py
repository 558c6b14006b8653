"""The verdict threshold: chosen once on labelled data (``dfd calibrate``, notebook 04), stored with
its ROC point in the mixture's ``config.json``, and used by every verdict the kit gives
(``dfd predict``, ``dfd serve``, its page, notebook 05's widget).

A mixture's fake probability is a ranking score, not a calibrated probability, so 0.5 is an
arbitrary cut. The rules here pick the cut from data:

- ``fpr``: the lowest threshold whose false-positive rate on the calibration reals is at most
  ``target_fpr`` (default 1 %): "at most 1 in 100 real images is called fake", as far as the
  calibration data resembles the images scored later. The threshold sits halfway between the
  last score flagged and the next one, so tiny numerical differences between runs do not flip
  the verdict of a calibration image.
- ``eer``: the equal error rate's threshold (:func:`dfd_lib.stats.metrics.equal_error_rate`).

A verdict is ``fake`` when the probability is at least the threshold. Without a calibration the
threshold is 0.5 and every output says "not calibrated"; an explicit threshold overrides both.
Calibrate on data the experts did not select or test on: notebook 04 uses its selection data
(the held-out clusters), never the test split, whose rates at the threshold are then reported
beside the target.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dfd_lib.core.atomic import atomic_write
from dfd_lib.data.manifest import FAKE, REAL
from dfd_lib.models.checkpoints import (
    CALIBRATED_WEIGHTS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    MixtureConfig,
    is_mixture_dir,
    read_config,
    weights_digest,
)
from dfd_lib.models.demo_weights import DEMO_MARKER, is_demo
from dfd_lib.stats.metrics import checked_arrays, equal_error_rate, tpr_at_fpr

RULES = ("fpr", "eer")
DEFAULT_TARGET_FPR = 0.01
DEFAULT_THRESHOLD = 0.5
CALIBRATED, NOT_CALIBRATED, GIVEN = "calibrated", "not calibrated", "given"

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """A chosen threshold and where it came from, as stored under ``calibration`` in ``config.json``."""

    threshold: float  # fake if the mixture's probability is at least this
    rule: str  # "fpr" (a target false-positive rate) or "eer" (the equal error rate)
    target_fpr: float | None  # the target of the "fpr" rule, None for "eer"
    fpr: float  # false-positive rate at the threshold on the calibration data
    tpr: float  # true-positive rate (fakes caught) there
    auc: float  # ROC AUC of the calibration data
    n_real: int
    n_fake: int
    data: str  # the calibration data's name (a path, a manifest and its splits)
    data_hash: str  # sha1 of its images' content hashes (or paths) and labels
    date: str  # when it was calibrated (UTC, ISO 8601)
    check: dict = field(default_factory=dict)  # rates at the threshold on a labelled test set, when one was given

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def rule_text(self) -> str:
        if self.rule == "eer":
            return "equal error rate"
        return f"false-positive rate at most {self.target_fpr:.4g}"

    def describe(self) -> str:
        """One line: the rule, its data and the rates there."""
        return (f"{self.rule_text} on {self.data}: FPR {self.fpr:.4f}, TPR {self.tpr:.4f} "
                f"({self.n_real} real / {self.n_fake} fake), {self.date[:10]}")


# --------------------------------------------------------------------------- choosing a threshold


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y, s = checked_arrays(labels, scores)
    if not (y == REAL).any() or not (y == FAKE).any():
        raise ValueError(f"calibration needs real and fake images; got {int((y == REAL).sum())} real, "
                         f"{int((y == FAKE).sum())} fake")
    return y, s


def rates_at(labels, scores, threshold: float) -> tuple[float, float]:
    """``(fpr, tpr)``: the share of reals and of fakes whose score is at least ``threshold``."""
    y, s = _labels_scores(labels, scores)
    flagged = s >= threshold
    return float(flagged[y == REAL].mean()), float(flagged[y == FAKE].mean())


def threshold_at_fpr(labels, scores, target_fpr: float = DEFAULT_TARGET_FPR) -> float:
    """The lowest threshold whose false-positive rate is at most ``target_fpr`` (most fakes
    caught under that constraint), halfway between the last score it flags and the next."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    y, s = _labels_scores(labels, scores)
    return tpr_at_fpr(y, s, target_fpr)[1]  # the metric tables' rule (TPR at 1 % FPR), so they agree


def threshold_at_eer(labels, scores) -> float:
    return float(np.clip(equal_error_rate(*_labels_scores(labels, scores))[1], 0.0, 1.0))


def dataset_fingerprint(table: pd.DataFrame) -> str:
    """sha1 over the rows' content hashes (their paths when the table has none) and labels, in a fixed order."""
    keys = table["hash"] if "hash" in table and table["hash"].notna().all() else table["path"].astype(str)
    lines = sorted(f"{key}\t{int(label)}" for key, label in zip(keys, table["label"]))
    return hashlib.sha1("\n".join(lines).encode("utf-8")).hexdigest()


def calibrate_scores(labels, scores, rule: str = "fpr", target_fpr: float = DEFAULT_TARGET_FPR,
                     data: str = "", data_hash: str = "") -> Calibration:
    """The threshold of ``rule`` on already-computed scores, with its ROC point."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    y, s = _labels_scores(labels, scores)
    threshold = threshold_at_fpr(y, s, target_fpr) if rule == "fpr" else threshold_at_eer(y, s)
    threshold = min(1.0, threshold)  # probabilities of exactly 1.0 can only be flagged, at 1.0
    fpr, tpr = rates_at(y, s, threshold)
    if not data_hash:
        data_hash = hashlib.sha1(np.concatenate([y, s]).tobytes()).hexdigest()
    return Calibration(threshold=threshold, rule=rule, target_fpr=float(target_fpr) if rule == "fpr" else None,
                       fpr=fpr, tpr=tpr, auc=float(roc_auc_score(y, s)), n_real=int((y == REAL).sum()),
                       n_fake=int((y == FAKE).sum()), data=data, data_hash=data_hash,
                       date=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat())


def check_rates(calibration: Calibration, labels, scores, data: str = "") -> dict:
    """The rates at the calibrated threshold on another labelled set, beside the target."""
    y, s = _labels_scores(labels, scores)
    fpr, tpr = rates_at(y, s, calibration.threshold)
    return {"data": data, "fpr": fpr, "tpr": tpr, "target_fpr": calibration.target_fpr,
            "calibration_fpr": calibration.fpr, "n_real": int((y == REAL).sum()), "n_fake": int((y == FAKE).sum())}


# --------------------------------------------------------------------------- the mixture's config.json


def write_calibration(weights_dir: str | os.PathLike, calibration: Calibration | None) -> Path:
    """Store ``calibration`` (None removes it) in the mixture's ``config.json``, atomically; the
    weights file is not touched."""
    weights_dir = Path(weights_dir)
    if not is_mixture_dir(weights_dir):
        raise CheckpointError(f"{weights_dir}: not a dfd-kit mixture (model.safetensors + config.json); "
                              "convert released weights first with `dfd convert-weights SRC DST`")
    recorded = {**calibration.to_dict(), CALIBRATED_WEIGHTS: weights_digest(weights_dir / WEIGHTS_FILE)} if calibration else {}
    config = dataclasses.replace(read_config(weights_dir), calibration=recorded)
    text = config.to_json() + "\n"
    return atomic_write(weights_dir / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_calibration(config: MixtureConfig) -> Calibration | None:
    if not config.calibration:
        return None
    try:
        return Calibration.from_dict(config.calibration)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid calibration in the mixture's {CONFIG_FILE}: {exc}") from None


# --------------------------------------------------------------------------- the threshold verdicts use


@dataclass(frozen=True)
class VerdictThreshold:
    """The threshold every verdict uses and where it came from: ``calibrated`` (the mixture's
    config), ``given`` (an explicit value, which wins) or ``not calibrated`` (0.5), each followed by
    ``; demo weights`` for a mixture trained on the built-in demo."""

    value: float
    source: str
    note: str
    calibration: Calibration | None = None  # the mixture's, even when a given value overrides it

    COLUMNS = ("verdict", "threshold", "threshold_source")  # what a row or an API answer gains

    def verdict(self, prob: float | None) -> str:
        """``fake`` if ``prob`` is at least the threshold, else ``real``; ``error`` when there is no score."""
        return "error" if prob is None or math.isnan(prob) else ("fake" if prob >= self.value else "real")

    def fields(self, prob: float | None = None) -> dict:
        """:attr:`COLUMNS` for one score (a row of ``dfd predict``'s CSV, an API answer)."""
        return {"verdict": self.verdict(prob), "threshold": self.value, "threshold_source": self.source}

    def info(self) -> dict:
        return {"value": self.value, "source": self.source, "note": self.note, "calibrated": self.calibration is not None,
                "calibration": self.calibration.to_dict() if self.calibration else None}


def resolve_threshold(config: MixtureConfig, given: float | None = None) -> VerdictThreshold:
    """An explicit ``given`` value, else the mixture's calibrated threshold, else 0.5 (not calibrated).
    For demo weights (:mod:`dfd_lib.models.demo_weights`) the source ends in ``; demo weights``."""
    verdicts = _threshold(config, given)
    if not is_demo(config):
        return verdicts
    return dataclasses.replace(verdicts, source=f"{verdicts.source}; {DEMO_MARKER}")


def _threshold(config: MixtureConfig, given: float | None) -> VerdictThreshold:
    calibration = read_calibration(config)
    if given is not None:
        if not 0.0 <= given <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {given}")
        mixture = f"; the mixture's calibrated threshold is {calibration.threshold:.4f}" if calibration else ""
        return VerdictThreshold(float(given), GIVEN, f"given: {given:g}{mixture}", calibration)
    if calibration is None:
        return VerdictThreshold(DEFAULT_THRESHOLD, NOT_CALIBRATED,
                                f"not calibrated: default {DEFAULT_THRESHOLD} (run `dfd calibrate` to choose one)")
    return VerdictThreshold(calibration.threshold, CALIBRATED, f"calibrated: {calibration.describe()}", calibration)
