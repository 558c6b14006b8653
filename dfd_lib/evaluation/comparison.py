"""Notebook 04's comparison, after the authors' motivation figure: (a) one model trained and
selected on the official split, (b) one expert per cluster re-split, (c) their mixture, all
scored on the cross-domain test split (the loss ablation is :mod:`dfd_lib.evaluation.ablation`, the
robustness :mod:`dfd_lib.evaluation.robustness`). Before them, when given, the baseline a user tries
first: a linear probe on notebook 01's frozen embeddings (:mod:`dfd_lib.evaluation.linear_probe`).

Every model here sees the same images (the train/val rows of the manifest plus the augmented
rows of notebook 03) with the same losses and schedule: the official-split model differs
from the experts only in how its images are split into training and validation, which is the
variable the authors' figure is about. The mixture's score is the mean of its experts'
softmax fake-probabilities, exactly what :class:`dfd_lib.models.experts.MixtureOfExperts` computes,
so it is taken from the experts' scores without a second pass over the images.

Every test-split figure comes with its stratified bootstrap interval (:mod:`dfd_lib.stats.bootstrap`):
``test_auc_lo`` / ``test_auc_hi`` beside ``test_auc``, and so on for AP, EER and the TPR at an FPR of
1 % and 0.1 % (whose thresholds are columns too).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dfd_lib.core.shards import ShardGroup, deal, interleave
from dfd_lib.data.manifest import TRAIN, VAL
from dfd_lib.data.resplit_table import resplit_column
from dfd_lib.evaluation.linear_probe import LinearProbe
from dfd_lib.evaluation.robustness import RobustnessResult
from dfd_lib.models.checkpoints import load_expert, mixture_from_experts
from dfd_lib.scoring.expert_scores import ExpertWeights, Preprocessing, expert_from_file, score_images
from dfd_lib.scoring.predictor import Predictor, auto_device
from dfd_lib.stats.bootstrap import INTERVAL_METRICS, BootstrapConfig, intervals
from dfd_lib.stats.group_metrics import per_group_metrics
from dfd_lib.stats.metrics import LOW_FPRS, binary_metrics, threshold_key, tpr_key
from dfd_lib.training.mixture_training import MixtureTrainResult, expert_jobs, save_experts_mixture
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import TrainResult
from dfd_lib.training.training_data import OFFICIAL_DIR, TrainingData
from dfd_lib.training.training_key import training_record
from dfd_lib.training.training_pool import TrainingJob, run_trainings

# The authors' AUCs on their cross-domain test (docs/method.md): their data, not ours.
AUTHORS_AUC = {"official split": 0.877, "cluster expert (best two)": (0.968, 0.964), "mixture of experts": 0.980}
OFFICIAL, EXPERT, MIXTURE, PROBE = "official split", "cluster expert", "mixture", "linear probe"
METRICS = ("auc", "ap", "eer", *(tpr_key(max_fpr) for max_fpr in LOW_FPRS), "acc_at_0.5", "acc_at_eer")
THRESHOLDS = tuple(threshold_key(max_fpr) for max_fpr in LOW_FPRS)
NO_INTERVALS = BootstrapConfig(bootstrap_resamples=0)


def train_official_split(trainval: pd.DataFrame, config: TrainConfig, out_dir: str | os.PathLike, resume: bool = True) -> TrainResult:
    """Model (a): trained on the rows whose official ``split`` is ``train``, its best epoch
    chosen on those whose ``split`` is ``val`` — the selection the authors started from."""
    return official_job(trainval, config, out_dir, resume).run()


def official_job(trainval: pd.DataFrame, config: TrainConfig, out_dir: str | os.PathLike, resume: bool = True) -> TrainingJob:
    """The training of :func:`train_official_split`, to run later or beside others (:mod:`dfd_lib.training.training_pool`)."""
    sides = trainval["split"].astype(str)
    return TrainingJob(trainval[sides == TRAIN], trainval[sides == VAL], config, Path(out_dir), resume)


def train_official_and_experts(
    data: TrainingData,
    configs: Sequence[TrainConfig],
    experts_dir: str | os.PathLike,
    mixture_dir: str | os.PathLike | None = None,
    resume: bool = True,
    processes: int = 1,
) -> tuple[TrainResult, MixtureTrainResult]:
    """Model (a), on the official split with the first expert's config (``experts_dir/official_split``), and (b),
    one expert per re-split of ``data`` (``configs``: one each) saved as a mixture in ``mixture_dir``
    (:func:`dfd_lib.training.mixture_training.train_mixture`): all ``processes`` at a time, model (a) first."""
    started = time.perf_counter()
    chosen, jobs = expert_jobs(data.trainval, configs, experts_dir, data.resplits, resume)
    official = official_job(data.trainval, configs[0], Path(experts_dir) / OFFICIAL_DIR, resume)
    first, *experts = run_trainings([official, *jobs], processes)
    return first, save_experts_mixture(chosen, experts, experts_dir, mixture_dir, data.provenance, started)


def score_experts(
    weights: Mapping[str, str | os.PathLike],
    table: pd.DataFrame,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    shards: ShardGroup | None = None,
) -> pd.DataFrame:
    """Fake-probabilities of each expert (``name -> best_ema.safetensors``) on the images of
    ``table``: one column per name, aligned with ``table``'s rows (NaN where an image cannot
    be read). Experts that share their preprocessing run together, so each image is decoded
    once, and a score an earlier table of the process computed for the same weights and the same
    input is reused (:mod:`dfd_lib.scoring.expert_scores`). On a GPU (``device``, default: one when
    there is one) it scores through the :class:`dfd_lib.scoring.predictor.Predictor` that ``dfd predict`` uses
    (:func:`score_experts_predictor`).

    With ``shards`` (every process of an ``accelerate launch`` group calls this with the same table)
    each process scores batches ``r, r+N, ...`` of the rows, on its own GPU when there are GPUs,
    and every process returns the whole table's scores (:func:`score_experts_sharded`)."""
    if not weights:
        raise ValueError("no experts to score")
    if shards is not None:
        return score_experts_sharded(weights, table, shards, batch_size, device, progress)
    if (torch.device(device) if device is not None else auto_device()).type != "cpu":
        return score_experts_predictor(weights, table, batch_size, device, progress)
    by_preprocessing: dict[Preprocessing, list[tuple[str, ExpertWeights]]] = {}
    for name, path in weights.items():
        expert, preprocessing = expert_from_file(path)
        by_preprocessing.setdefault(preprocessing, []).append((name, expert))
    scores = pd.DataFrame(index=table.index, columns=list(weights), dtype=float)
    paths = [str(p) for p in table["path"]]
    for preprocessing, named in by_preprocessing.items():
        probs = score_images([expert for _, expert in named], preprocessing, paths, batch_size=batch_size, progress=progress)
        for j, (name, _) in enumerate(named):
            scores[name] = probs[:, j]
    return scores


def score_experts_sharded(weights: Mapping[str, str | os.PathLike], table: pd.DataFrame, shards: ShardGroup,
                          batch_size: int = 64, device: str | None = None, progress: bool = True) -> pd.DataFrame:
    """:func:`score_experts` by the processes of ``shards``: whole batches dealt, the parts gathered back
    in ``table``'s order. The scores are one process's where each forward pass sees the same batch (a
    table of one decoding chunk on the CPU), else within float rounding of a batch's composition."""
    mine = deal(range(len(table)), shards.rank, shards.processes, block=batch_size)
    part = score_experts(weights, table.iloc[mine], batch_size, shards.device(device), progress and shards.is_main)
    parts = shards.gather(part.reset_index(drop=True))
    rows = interleave([list(one.itertuples(index=False, name=None)) for one in parts], block=batch_size)
    return pd.DataFrame(rows, index=table.index, columns=list(weights), dtype=float)


def score_experts_predictor(
    weights: Mapping[str, str | os.PathLike],
    table: pd.DataFrame,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`score_experts` through the plain torch :class:`dfd_lib.scoring.predictor.Predictor`, nothing
    reused: the reference the fast path is checked against (tests, bench/bench_eval04.py) and the GPU path."""
    by_preprocessing: dict[tuple, list[str]] = {}
    for name, path in weights.items():
        meta = load_expert(path)[1]
        key = (meta["image_size"], tuple(meta["mean"]), tuple(meta["std"]), meta.get("interpolation", "bilinear"))
        by_preprocessing.setdefault(key, []).append(name)
    scores = pd.DataFrame(index=table.index, columns=list(weights), dtype=float)
    paths = [str(p) for p in table["path"]]
    for names in by_preprocessing.values():
        model, config = mixture_from_experts([weights[name] for name in names])
        predictor = Predictor(model, config, device=device, batch_size=batch_size)
        predictions = predictor.predict(paths, progress=progress)
        probs = np.array([p.expert_probs if p.ok else [math.nan] * len(names) for p in predictions], dtype=np.float64)
        for j, name in enumerate(names):
            scores[name] = probs[:, j]
    return scores


def metric_columns(prefix: str = "test_") -> list[str]:
    """The columns :func:`metrics_row` writes, in order: each metric, then its interval if it has one, then the thresholds."""
    columns = []
    for k in METRICS:
        columns += [k, f"{k}_lo", f"{k}_hi"] if k in INTERVAL_METRICS else [k]
    return [f"{prefix}{k}" for k in [*columns, *THRESHOLDS]]


def metrics_row(labels: np.ndarray, scores: np.ndarray, bootstrap: BootstrapConfig | None = None, prefix: str = "test_") -> dict:
    """:func:`~dfd_lib.stats.metrics.binary_metrics` and, with ``bootstrap``, its intervals (NaN
    without), as the columns of :func:`metric_columns`."""
    values = {**binary_metrics(labels, scores), **intervals(labels, scores, bootstrap or NO_INTERVALS)}
    return {column: values[column[len(prefix):]] for column in metric_columns(prefix)}


@dataclass
class Headline:
    """The headline comparison on the test split."""

    table: pd.DataFrame  # one row per model: role, validation AUC (its selection set), test AUC, AP, EER, accuracies
    scores: pd.DataFrame  # one column of fake-probabilities per model, rows of the test table that could be read
    rows: pd.DataFrame  # those test rows, aligned with ``scores``
    unreadable: int  # test images that could not be scored (left out of every metric)
    seconds: float
    weights: dict[str, Path] = field(default_factory=dict)  # model -> its weights file (the mixture and the probe have none)
    notes: list[str] = field(default_factory=list)  # how the rows were scored: the probe, images left out

    @property
    def note(self) -> str:
        return "\n".join(self.notes)

    @property
    def probe_model(self) -> str | None:
        """The linear probe's row, None when the comparison has none."""
        if "role" not in self.table.columns:
            return None
        names = self.table.index[self.table["role"] == PROBE]
        return str(names[0]) if len(names) else None

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``name -> (labels, scores)`` for :func:`dfd_lib.stats.roc_plot.plot_roc_curves`."""
        return {name: (self.labels, self.scores[name].to_numpy()) for name in self.scores.columns}

    @property
    def main_models(self) -> list[str]:
        """The official-split model and the mixture: the two curves the comparison is about."""
        return list(self.table.index[self.table["role"].isin([OFFICIAL, MIXTURE])])

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"].to_numpy().astype(int)


def expert_names(experts: MixtureTrainResult) -> list[str]:
    return [f"expert {i} (cluster {i} held out)" for i in experts.summary["resplit"]]


def headline_comparison(
    test: pd.DataFrame,
    official: TrainResult,
    experts: MixtureTrainResult,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
    bootstrap: BootstrapConfig | None = None,
    probe: LinearProbe | None = None,
    shards: ShardGroup | None = None,
) -> Headline:
    """Score (a) the official-split model, (b) every expert and (c) their mixture on ``test``,
    each figure with its ``bootstrap`` interval; with ``probe``, the linear probe's row comes first.
    The test images any trained model cannot read are left out of every row (the probe's included).
    ``shards``: the test split scored by the processes of an ``accelerate launch`` group (:func:`score_experts`)."""
    started = time.perf_counter()
    names = expert_names(experts)
    weights = {OFFICIAL: official.best_weights, **{n: r.best_weights for n, r in zip(names, experts.experts)}}
    scores = score_experts(weights, test, batch_size=batch_size, device=device, progress=progress, shards=shards)
    mixture_name = f"mixture of {len(names)} experts"
    scores[mixture_name] = scores[names].mean(axis=1)  # MixtureOfExperts: mean of the softmax fake-probabilities
    readable = scores.notna().all(axis=1).to_numpy()
    scores = scores[readable].reset_index(drop=True)
    rows_scored = test[readable].reset_index(drop=True)
    labels = rows_scored["label"].to_numpy().astype(int)
    rows, notes = [], []
    if probe is not None:
        probe_scores, missing = probe.scores_of(rows_scored)
        scores.insert(0, probe.name, probe_scores)
        rows.append(_probe_row(probe, labels, probe_scores, bootstrap))
        notes.append(probe.note(missing))
    if (~readable).any():
        notes.append(f"{int((~readable).sum())} test image(s) the trained models cannot read are left out of every row")
    trainings = [(OFFICIAL, OFFICIAL, "official val", official)]
    trainings += [(n, EXPERT, f"held-out cluster {i}", r) for n, i, r in zip(names, experts.summary["resplit"], experts.experts)]
    for name, role, val_set, result in trainings:
        rows.append({"model": name, "role": role, "backbone": result.config.backbone, "validated on": val_set,
                     "val_auc": result.best_val_auc, "best_epoch": result.best_epoch + 1,
                     **metrics_row(labels, scores[name].to_numpy(), bootstrap)})
    rows.append({"model": mixture_name, "role": MIXTURE, "backbone": "+".join(sorted(set(experts.summary["backbone"]))),
                 "validated on": "—", "val_auc": math.nan, "best_epoch": math.nan,
                 **metrics_row(labels, scores[mixture_name].to_numpy(), bootstrap)})
    table = pd.DataFrame(rows).set_index("model")
    table["n_test"] = int(readable.sum())
    return Headline(table=table, scores=scores, rows=rows_scored, unreadable=int((~readable).sum()),
                    seconds=time.perf_counter() - started, weights={name: Path(path) for name, path in weights.items()},
                    notes=notes)


def _probe_row(probe: LinearProbe, labels: np.ndarray, scores: np.ndarray, bootstrap: BootstrapConfig | None) -> dict:
    return {"model": probe.name, "role": PROBE, "backbone": probe.backbone, "validated on": "official val",
            "val_auc": probe.val_auc, "best_epoch": math.nan, **metrics_row(labels, scores, bootstrap)}


def per_group_table(headline: Headline, by: str = "family", bootstrap: BootstrapConfig | None = None) -> pd.DataFrame:
    """Every model's test metrics per value of ``by`` in the test rows, one row per (group, model)
    (a fake family is scored against all the reals: :func:`dfd_lib.stats.group_metrics.per_group_metrics`),
    with the group's image count and its intervals; a group of reals alone has no AUC and no row."""
    rows = headline.rows
    if by not in rows.columns:
        raise ValueError(f"the test table has no column {by!r}")
    images = rows.groupby(by).size()
    classes = rows.groupby(by)["label"].agg(lambda s: "+".join(sorted({"real" if v == 0 else "fake" for v in s})))
    parts = []
    for name in headline.scores.columns:
        table = per_group_metrics(rows, headline.scores[name].to_numpy(), by=by, bootstrap=bootstrap or NO_INTERVALS)
        table = table[table[by].map(classes).fillna("real+fake") != "real"]
        parts.append(pd.DataFrame({by: table[by], "model": name,
                                   "images": table[by].map(images).fillna(len(rows)).astype(int).to_numpy(),
                                   "classes": table[by].map(classes).fillna("real+fake").to_numpy(),
                                   **{c: table[c[len("test_"):]].to_numpy() for c in metric_columns()}}))
    result = pd.concat(parts, ignore_index=True)
    position = {group: i for i, group in enumerate(parts[0][by])}  # groups in per_group_metrics' order, "(all)" last
    result = result.iloc[np.argsort(result[by].map(position).to_numpy(), kind="stable")]
    return result.set_index([by, "model"])


PER_CLUSTER_TEST_COLUMNS = {"test AUC": "auc", "test AUC low": "auc_lo", "test AUC high": "auc_hi",
                            **{f"test TPR@{m * 100:g}% FPR": tpr_key(m) for m in LOW_FPRS}}


def per_cluster_table(data: TrainingData, experts: MixtureTrainResult, headline: Headline) -> pd.DataFrame:
    """Per re-split: its held-out cluster (images, reals, fakes), its expert's AUC there
    (the best validation epoch) and on the cross-domain test. The test split has no clusters
    (it was never clustered), so it appears as one column."""
    names = expert_names(experts)
    rows = []
    for name, i, result in zip(names, experts.summary["resplit"], experts.experts):
        side = data.trainval[resplit_column(i)]
        val, train = data.trainval[side == VAL], data.trainval[side == TRAIN]
        families = val[val["label"] == 1]["family"].value_counts()
        rows.append({"resplit": int(i), "held-out cluster": int(i), "train images": len(train), "val images": len(val),
                     "val real": int((val["label"] == 0).sum()), "val fake": int((val["label"] == 1).sum()),
                     "val fake families": ", ".join(f"{f} {n}" for f, n in families.items()),
                     "held-out AUC": result.best_val_auc,
                     **{column: headline.table.loc[name, f"test_{key}"] for column, key in PER_CLUSTER_TEST_COLUMNS.items()}})
    return pd.DataFrame(rows).set_index("resplit")


def training_records(official: TrainResult, experts: MixtureTrainResult, ablation=None, ladder=None) -> dict[str, dict]:
    """Every training of notebook 04 (the official split, the experts, the loss ablation's, the ladder's)
    by name: where its backbone started from and the fingerprint of its rows and settings, as each
    training recorded them when it started (a reused training keeps its own record)."""
    trainings = {OFFICIAL: official, **dict(zip(expert_names(experts), experts.experts))}
    if ablation is not None:
        trainings.update({f"ablation {name}": result for name, result in ablation.results.items()})
    if ladder is not None:
        trainings.update({f"ladder {r.out_dir.parent.name}/{r.out_dir.name}": r for r in ladder.trained})
    return {name: training_record(result.weights_source, result.key) for name, result in trainings.items()}


def summary_metrics(
    headline: Headline,
    official: TrainResult,
    experts: MixtureTrainResult,
    ablation: pd.DataFrame | None = None,
    robustness: RobustnessResult | None = None,
    ladder=None,
) -> dict:
    """The key numbers of notebook 04 for ``run.record_metrics``; ``ladder`` is a
    :class:`dfd_lib.evaluation.ladder_results.Ladder`."""
    table = headline.table
    values = {
        "test_auc": table["test_auc"].round(4).to_dict(),
        "test_auc_interval": {name: [round(r.test_auc_lo, 4), round(r.test_auc_hi, 4)] for name, r in
                              zip(table.index, table[["test_auc_lo", "test_auc_hi"]].itertuples())},
        **{f"test_{tpr_key(m)}": table[f"test_{tpr_key(m)}"].round(4).to_dict() for m in LOW_FPRS},
        "official_split_test_auc": float(table.loc[table["role"] == OFFICIAL, "test_auc"].iloc[0]),
        **({"linear_probe_test_auc": float(table.loc[headline.probe_model, "test_auc"])} if headline.probe_model else {}),
        "expert_test_auc": table.loc[table["role"] == EXPERT, "test_auc"].round(4).tolist(),
        "mixture_test_auc": float(table.loc[table["role"] == MIXTURE, "test_auc"].iloc[0]),
        "official_split_val_auc": official.best_val_auc,
        "expert_val_auc": [float(r.best_val_auc) for r in experts.experts],
        "n_test": int(table["n_test"].iloc[0]),
        "seconds": {"official_split": official.seconds, "experts": experts.seconds,
                    "per_expert": [float(r.seconds) for r in experts.experts], "scoring": headline.seconds},
        "authors_auc_their_data": AUTHORS_AUC,
        "train_images_per_s": float(np.nanmean([r.history["images_per_s"].mean() for r in [official, *experts.experts]])),
    }
    if ablation is not None and len(ablation):
        values["ablation_test_auc"] = ablation["test_auc"].round(4).to_dict()
        values["ablation_val_auc"] = ablation["val_auc"].round(4).to_dict()
        values["seconds"]["ablation"] = float(ablation.loc[~ablation["reused"], "train_seconds"].sum())
    if robustness is not None and len(robustness.table):
        rob = robustness.table
        values["robustness_auc"] = {"none" if r.perturbation == "none" else f"{r.perturbation} {r.level:g}": r.auc
                                    for r in rob.itertuples()}
        values["seconds"]["robustness"] = robustness.seconds
    if ladder is not None and len(ladder.table):
        values["ladder"] = ladder_summary(ladder.table)
        values["seconds"]["ladder"] = {"training": ladder.training_seconds, "scoring": ladder.seconds}
    return values


def ladder_summary(table: pd.DataFrame) -> dict:
    """``"<rung> <model>" -> {metric: value, its interval, seed mean and sd, Holm-adjusted p-value, verdict,
    from}`` for ``metrics.json``."""
    keys = [c for c in table.columns if c.startswith("test_") or c.startswith("delta_")]
    return {f"{rung} {row['model']}": {**{k.removeprefix("test_"): _rounded(row[k]) for k in keys},
                                       "p_holm": _rounded(row["p_holm"]), "verdict": row["verdict"], "from": row["from"],
                                       "n_seeds": int(row["n_seeds"])}
            for rung, row in table.iterrows()}


def _rounded(value) -> float:
    return round(float(value), 4) if np.isfinite(value) else math.nan
