"""Notebook 04's comparison, after the authors' motivation figure: (a) one model trained and
selected on the official split, (b) one expert per cluster re-split, (c) their mixture, all
scored on the cross-domain test split; a loss ablation for one expert; the mixture's
robustness to JPEG, resizing and blur.

Every model here sees the same images (the train/val rows of the manifest plus the augmented
rows of notebook 03) with the same losses and schedule: the official-split model differs
from the experts only in how its images are split into training and validation, which is the
variable the authors' figure is about. The mixture's score is the mean of its experts'
softmax fake-probabilities, exactly what :class:`dfd_lib.models.MixtureOfExperts` computes,
so it is taken from the experts' scores without a second pass over the images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dfd_lib.evaluate import binary_metrics, per_group_metrics, plot_robustness, robustness_table
from dfd_lib.losses import LossConfig
from dfd_lib.train import MixtureTrainResult, TrainConfig, TrainResult, load_expert, mixture_from_experts, train_expert

# The authors' AUCs on their cross-domain test (DESIGN.md §1): their data, not ours.
AUTHORS_AUC = {"official split": 0.877, "cluster expert (best two)": (0.968, 0.964), "mixture of experts": 0.980}
OFFICIAL, EXPERT, MIXTURE = "official split", "cluster expert", "mixture"
ALL_LOSSES = "CE + NCE + KL"
ABLATION_VARIANTS: dict[str, tuple[str, ...]] = {  # variant -> the losses it switches on
    "CE only": ("ce",),
    "CE + NCE": ("ce", "nce"),
    "CE + KL": ("ce", "kl"),
    ALL_LOSSES: ("ce", "nce", "kl"),
}
_METRICS = ("auc", "ap", "eer", "acc_at_0.5", "acc_at_eer")


# --------------------------------------------------------------------------- the data


@dataclass
class TrainingData:
    """What notebook 04 trains and tests on, read from the run folder."""

    trainval: pd.DataFrame  # train/val rows + attached augmented rows (column ``augmented``); split, cluster, resplit_<i>
    test: pd.DataFrame  # the manifest's cross-domain test rows
    resplits: list[int]  # the re-splits that get an expert
    augmented: int  # augmented rows in ``trainval``
    note: str  # where the augmented rows come from, or why there are none

    def summary(self) -> pd.DataFrame:
        """Reals and fakes (and augmented images) on each side of every split."""
        sides = {"official train": self.trainval["split"].eq("train"), "official val": self.trainval["split"].eq("val")}
        for i in self.resplits:
            column = self.trainval[f"resplit_{i}"]
            sides[f"resplit_{i} train"] = column.eq("train")
            sides[f"resplit_{i} val (cluster {i})"] = column.eq("val")
        rows = {name: _counts(self.trainval[mask.fillna(False).astype(bool)]) for name, mask in sides.items()}
        rows["test (cross-domain)"] = _counts(self.test)
        return pd.DataFrame.from_dict(rows, orient="index")


def _counts(table: pd.DataFrame) -> dict:
    augmented = table["augmented"] if "augmented" in table.columns else pd.Series(False, index=table.index)
    return {"real": int((table["label"] == 0).sum()), "fake": int((table["label"] == 1).sum()),
            "augmented": int(augmented.fillna(False).astype(bool).sum()), "total": int(len(table))}


def load_training_data(run, use_augmented: bool = True, max_experts: int = 0) -> TrainingData:
    """The manifest (01), re-splits (02) and, if present and wanted, the augmented rows (03)
    of ``run`` (a :class:`dfd_lib.runs.RunDir`), the augmented rows re-attached to their
    sources' sides of every re-split (:func:`dfd_lib.augment.attach_to_resplits`, which also
    checks for leakage). ``max_experts`` > 0 keeps the first re-splits only."""
    from dfd_lib import augment, runs, split
    from dfd_lib.manifest import Manifest

    manifest = Manifest.load(run.require(runs.MANIFEST, "01_features_umap")).table
    resplits = split.load_resplits(run.require(runs.RESPLITS, "02_cluster_split"))
    test = manifest[manifest["split"].astype(str) == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError("the manifest has no 'test' rows: the headline comparison needs a cross-domain test split "
                         "(notebook 01's test_dataset)")
    if max_experts < 0:
        raise ValueError(f"max_experts must be >= 0, got {max_experts}")
    columns = split.resplit_columns(resplits)
    chosen = [int(c[len(split.RESPLIT_PREFIX):]) for c in columns]
    chosen = chosen[:max_experts] if max_experts else chosen
    augmented_path = run.path(runs.AUGMENTED_MANIFEST)
    parts = [resplits.assign(augmented=False)]
    if not use_augmented:
        note = "use_augmented is off: training on the original train/val images only"
    elif not augmented_path.is_file():
        note = (f"no {runs.AUGMENTED_MANIFEST} in the run folder (notebook 03 was skipped): "
                "training on the original train/val images only")
    else:
        attached = augment.attach_to_resplits(resplits, Manifest.load(augmented_path).table)
        parts.append(attached.assign(augmented=True))
        note = (f"{len(attached)} augmented images from notebook 03, each on its source's side of every split"
                + (f" ({attached.attrs['dropped']} dropped: source in no re-split)" if attached.attrs.get("dropped") else ""))
    trainval = pd.concat(parts, ignore_index=True)
    trainval["group"] = trainval["group"].astype(str)
    return TrainingData(trainval=trainval, test=test, resplits=chosen, augmented=int(trainval["augmented"].sum()), note=note)


# --------------------------------------------------------------------------- configurations


def expert_configs(base: TrainConfig, backbones: Sequence[str], backbone_weights: Sequence[str] | str, count: int) -> list[TrainConfig]:
    """``count`` copies of ``base``, the i-th with backbone ``backbones[i % len]`` and local
    weights ``backbone_weights[i % len]`` ("" or an empty list: the package / random weights;
    relative paths are taken from the project root)."""
    from dfd_lib.paths import resolve

    if isinstance(backbones, str) or not backbones:
        raise ValueError(f"backbones must be a non-empty list of timm names, got {backbones!r}")
    weights = [backbone_weights] if isinstance(backbone_weights, str) else list(backbone_weights)
    weights = [str(resolve(w)) if str(w) else None for w in weights] or [None]
    return [dataclasses.replace(base, backbone=str(backbones[i % len(backbones)]), weights_path=weights[i % len(weights)])
            for i in range(count)]


def configs_table(configs: Mapping[str, TrainConfig]) -> pd.DataFrame:
    """The settings that differ between runs, plus the main shared ones, one row per run."""
    rows = {}
    for name, config in configs.items():
        d = config.to_dict()
        loss = d.pop("loss")
        d.pop("augment")
        rows[name] = {**{k: d[k] for k in ("backbone", "weights_path", "image_size", "epochs", "batch_size", "lr",
                                            "freeze_stages", "max_steps_per_epoch", "ema_decay")},
                      **{k: loss[k] for k in ("ce_weight", "nce_weight", "kl_weight", "kl_fraction")}}
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------- several GPUs

LAUNCH_DIR = "launch"  # under the experts folder


def write_launch_files(experts_dir: str | os.PathLike, data: TrainingData, configs: Sequence[TrainConfig],
                       official_config: TrainConfig) -> str:
    """Write what ``accelerate launch -m dfd_lib.train`` needs to train this notebook's models
    on several GPUs into ``experts_dir/launch`` (the training table with the augmented rows,
    the official split's two tables, one config per training) and return the commands. Run
    them, then run the notebook again with ``resume`` on: it finds every training finished
    (same settings, same folders) and goes straight to scoring."""
    from dfd_lib.manifest import Manifest
    from dfd_lib.split import save_resplits

    experts_dir = Path(experts_dir)
    launch = experts_dir / LAUNCH_DIR
    launch.mkdir(parents=True, exist_ok=True)
    table = save_resplits(data.trainval, launch / "trainval.csv")
    sides = data.trainval["split"].astype(str)
    official_train = Manifest(data.trainval[sides == "train"].reset_index(drop=True)).save(launch / "official_train.csv")
    official_val = Manifest(data.trainval[sides == "val"].reset_index(drop=True)).save(launch / "official_val.csv")
    lines = ["# each command trains on every GPU of the machine (add --num_processes N, --mixed_precision bf16 as you like)"]
    official_json = launch / "official_split.json"
    official_json.write_text(json.dumps(official_config.to_dict(), indent=2) + "\n", encoding="utf-8")
    lines.append(f"accelerate launch -m dfd_lib.train --config {official_json} --train-table {official_train} "
                 f"--val-table {official_val} --out-dir {experts_dir / OFFICIAL_DIR}")
    for i, config in zip(data.resplits, configs):
        path = launch / f"expert_{i}.json"
        path.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        lines.append(f"accelerate launch -m dfd_lib.train --config {path} --table {table} --resplits {i} --out-dir {experts_dir}")
    commands = "\n".join(lines) + "\n"
    (launch / "commands.sh").write_text(commands, encoding="utf-8")
    return commands


# --------------------------------------------------------------------------- training

OFFICIAL_DIR = "official_split"  # the official-split model's folder, beside expert_<i>/


def train_official_split(trainval: pd.DataFrame, config: TrainConfig, out_dir: str | os.PathLike, resume: bool = True) -> TrainResult:
    """Model (a): trained on the rows whose official ``split`` is ``train``, its best epoch
    chosen on those whose ``split`` is ``val`` — the selection the authors started from."""
    sides = trainval["split"].astype(str)
    return train_expert(trainval[sides == "train"], trainval[sides == "val"], config, out_dir, resume=resume)


@dataclass
class AblationResult:
    resplit: int
    results: dict[str, TrainResult]  # variant -> its training
    reused: str | None  # the variant taken from the experts' training instead of trained again
    seconds: float  # training time of the variants trained here

    def weights(self) -> dict[str, Path]:
        return {name: result.best_weights for name, result in self.results.items()}


def ablation_config(config: TrainConfig, losses: Sequence[str], max_steps_per_epoch: int = 0) -> TrainConfig:
    """``config`` with only ``losses`` switched on (at their configured weight, or the default
    weight where ``config`` has them off) and, if > 0, a cap on the steps per epoch."""
    defaults = LossConfig()
    weights = {f"{name}_weight": (getattr(config.loss, f"{name}_weight") or getattr(defaults, f"{name}_weight"))
               if name in losses else 0.0 for name in ("ce", "nce", "kl")}
    steps = config.max_steps_per_epoch
    if max_steps_per_epoch > 0:
        steps = min(max_steps_per_epoch, steps) if steps is not None else max_steps_per_epoch
    return dataclasses.replace(config, loss=dataclasses.replace(config.loss, **weights), max_steps_per_epoch=steps)


def loss_ablation(
    trainval: pd.DataFrame,
    experts: MixtureTrainResult,
    out_dir: str | os.PathLike,
    resplit: int | None = None,
    max_steps_per_epoch: int = 0,
    resume: bool = True,
    enabled: bool = True,
) -> AblationResult:
    """The expert of re-split ``resplit`` (default: the first trained) again with each loss
    combination of :data:`ABLATION_VARIANTS`, its own config otherwise. The experts' run of
    that re-split is reused for the all-three variant when it is that variant, i.e. when
    ``max_steps_per_epoch`` does not shorten the ablation; otherwise all four are trained at
    the same budget. ``enabled=False`` trains nothing and returns an empty result."""
    resplits = [int(i) for i in experts.summary["resplit"]]
    resplit = resplits[0] if resplit is None else int(resplit)
    if resplit not in resplits:
        raise ValueError(f"re-split {resplit} has no expert; the experts cover re-splits {resplits}")
    if not enabled:
        return AblationResult(resplit=resplit, results={}, reused=None, seconds=0.0)
    own = experts.experts[resplits.index(resplit)]
    column = trainval[f"resplit_{resplit}"]
    train, val = trainval[column == "train"], trainval[column == "val"]
    out_dir = Path(out_dir)
    results: dict[str, TrainResult] = {}
    reused = None
    started = time.perf_counter()
    for name, losses in ABLATION_VARIANTS.items():
        variant = ablation_config(own.config, losses, max_steps_per_epoch)
        if own.config == variant:
            results[name], reused = own, name
            continue
        slug = "_".join(losses)
        results[name] = train_expert(train, val, variant, out_dir / f"ablation_{resplit}_{slug}", resume=resume)
    return AblationResult(resplit=resplit, results=results, reused=reused, seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------- scoring


def score_experts(
    weights: Mapping[str, str | os.PathLike],
    table: pd.DataFrame,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Fake-probabilities of each expert (``name -> best_ema.safetensors``) on the images of
    ``table``: one column per name, aligned with ``table``'s rows (NaN where an image cannot
    be read). Experts that share their preprocessing run together, so each image is decoded
    once, through the :class:`dfd_lib.inference.Predictor` that ``dfd predict`` uses."""
    from dfd_lib.inference import Predictor

    if not weights:
        raise ValueError("no experts to score")
    by_preprocessing: dict[tuple, list[str]] = {}
    for name, path in weights.items():
        meta = load_expert(path)[1]
        key = (meta["image_size"], tuple(meta["mean"]), tuple(meta["std"]))
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


def _metrics_row(labels: np.ndarray, scores: np.ndarray) -> dict:
    metrics = binary_metrics(labels, scores)
    return {f"test_{k}": metrics[k] for k in _METRICS}


@dataclass
class Headline:
    """The headline comparison on the test split."""

    table: pd.DataFrame  # one row per model: role, validation AUC (its selection set), test AUC, AP, EER, accuracies
    scores: pd.DataFrame  # one column of fake-probabilities per model, rows of the test table that could be read
    rows: pd.DataFrame  # those test rows, aligned with ``scores``
    unreadable: int  # test images that could not be scored (left out of every metric)
    seconds: float

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``name -> (labels, scores)`` for :func:`dfd_lib.evaluate.plot_roc_curves`."""
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
) -> Headline:
    """Score (a) the official-split model, (b) every expert and (c) their mixture on ``test``."""
    started = time.perf_counter()
    names = expert_names(experts)
    weights = {OFFICIAL: official.best_weights, **{n: r.best_weights for n, r in zip(names, experts.experts)}}
    scores = score_experts(weights, test, batch_size=batch_size, device=device, progress=progress)
    mixture_name = f"mixture of {len(names)} experts"
    scores[mixture_name] = scores[names].mean(axis=1)  # MixtureOfExperts: mean of the softmax fake-probabilities
    readable = scores.notna().all(axis=1).to_numpy()
    scores = scores[readable].reset_index(drop=True)
    rows_scored = test[readable].reset_index(drop=True)
    labels = rows_scored["label"].to_numpy().astype(int)
    rows = []
    trainings = [(OFFICIAL, OFFICIAL, "official val", official)]
    trainings += [(n, EXPERT, f"held-out cluster {i}", r) for n, i, r in zip(names, experts.summary["resplit"], experts.experts)]
    for name, role, val_set, result in trainings:
        rows.append({"model": name, "role": role, "backbone": result.config.backbone, "validated on": val_set,
                     "val_auc": result.best_val_auc, "best_epoch": result.best_epoch + 1,
                     **_metrics_row(labels, scores[name].to_numpy())})
    rows.append({"model": mixture_name, "role": MIXTURE, "backbone": "+".join(sorted(set(experts.summary["backbone"]))),
                 "validated on": "—", "val_auc": math.nan, "best_epoch": math.nan,
                 **_metrics_row(labels, scores[mixture_name].to_numpy())})
    table = pd.DataFrame(rows).set_index("model")
    table["n_test"] = int(readable.sum())
    return Headline(table=table, scores=scores, rows=rows_scored, unreadable=int((~readable).sum()),
                    seconds=time.perf_counter() - started)


def per_group_auc(headline: Headline, by: str = "family") -> pd.DataFrame:
    """Test AUC of every model per value of ``by`` in the test rows (a fake family is scored against all
    the reals: :func:`dfd_lib.evaluate.per_group_metrics`), with the group's image count."""
    rows = headline.rows
    if by not in rows.columns:
        raise ValueError(f"the test table has no column {by!r}")
    table = pd.DataFrame({name: per_group_metrics(rows, headline.scores[name].to_numpy(), by=by).set_index(by)["auc"]
                          for name in headline.scores.columns})
    table.insert(0, "images", rows.groupby(by).size().reindex(table.index).fillna(len(rows)).astype(int))
    classes = rows.groupby(by)["label"].agg(lambda s: "+".join(sorted({"real" if v == 0 else "fake" for v in s})))
    table.insert(1, "classes", classes.reindex(table.index).fillna("real+fake"))
    return table[table["classes"] != "real"]  # a group of reals alone has no AUC (each fake group is scored against them)


def per_cluster_table(data: TrainingData, experts: MixtureTrainResult, headline: Headline) -> pd.DataFrame:
    """Per re-split: its held-out cluster (images, reals, fakes), its expert's AUC there
    (the best validation epoch) and on the cross-domain test. The test split has no clusters
    (it was never clustered), so it appears as one column."""
    names = expert_names(experts)
    rows = []
    for name, i, result in zip(names, experts.summary["resplit"], experts.experts):
        side = data.trainval[f"resplit_{i}"]
        val, train = data.trainval[side == "val"], data.trainval[side == "train"]
        families = val[val["label"] == 1]["family"].value_counts()
        rows.append({"resplit": int(i), "held-out cluster": int(i), "train images": len(train), "val images": len(val),
                     "val real": int((val["label"] == 0).sum()), "val fake": int((val["label"] == 1).sum()),
                     "val fake families": ", ".join(f"{f} {n}" for f, n in families.items()),
                     "held-out AUC": result.best_val_auc, "test AUC": headline.table.loc[name, "test_auc"]})
    return pd.DataFrame(rows).set_index("resplit")


def ablation_table(ablation: AblationResult, test: pd.DataFrame, batch_size: int = 64, device: str | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Each loss combination of the ablation: its weights, optimiser steps, validation AUC on
    the held-out cluster and its metrics on the test split (empty when the ablation did not run)."""
    columns = ["ce_weight", "nce_weight", "kl_weight", "epochs", "steps", "val_auc", *[f"test_{k}" for k in _METRICS],
               "train_seconds", "reused"]
    if not ablation.results:
        return pd.DataFrame(columns=columns).rename_axis("losses")
    scores = score_experts(ablation.weights(), test, batch_size=batch_size, device=device, progress=progress)
    readable = scores.notna().all(axis=1).to_numpy()
    labels = test["label"].to_numpy().astype(int)[readable]
    rows = {}
    for name, result in ablation.results.items():
        loss, history = result.config.loss, result.history
        steps_per_epoch = int(np.ceil(history["train_images"] / result.config.batch_size).max()) if len(history) else 0
        rows[name] = {"ce_weight": loss.ce_weight, "nce_weight": loss.nce_weight, "kl_weight": loss.kl_weight,
                      "epochs": result.config.epochs, "steps": steps_per_epoch * result.config.epochs,
                      "val_auc": result.best_val_auc, **_metrics_row(labels, scores.loc[readable, name].to_numpy()),
                      "train_seconds": float(history["train_seconds"].sum()) if len(history) else math.nan,
                      "reused": name == ablation.reused}
    return pd.DataFrame.from_dict(rows, orient="index")[columns].rename_axis("losses")


# --------------------------------------------------------------------------- robustness


@dataclass
class RobustnessResult:
    table: pd.DataFrame  # perturbation, level, auc, ap, acc_at_0.5, n (empty when not run)
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
) -> RobustnessResult:
    """AUC of the saved mixture (loaded from ``weights_dir`` as ``dfd predict`` loads it) on
    the test images unchanged and under each perturbation level; ``max_images`` > 0 scores a
    sample of that many, stratified by label. ``enabled=False`` returns an empty result."""
    from dfd_lib.inference import Predictor

    if not enabled:
        empty = pd.DataFrame(columns=["perturbation", "level", "auc", "ap", "acc_at_0.5", "n", "reason"])
        return RobustnessResult(table=empty, figure=None, images=0, seconds=0.0)
    started = time.perf_counter()
    rows = stratified_sample(test, max_images, seed)
    predictor = Predictor.load(weights_dir, device=device, batch_size=batch_size, malloc_tuning=False)

    def predict(images):
        return [p.prob if p.ok else 0.5 for p in predictor.predict(images)]

    table = robustness_table(predict, list(rows["path"]), rows["label"].astype(int).tolist(), levels, batch_size=batch_size)
    figure = plot_robustness(table, figure_path, title=f"Mixture of {predictor.num_experts} experts: test AUC under degradations")
    return RobustnessResult(table=table, figure=figure, images=len(rows), seconds=time.perf_counter() - started)


def stratified_sample(table: pd.DataFrame, max_rows: int, seed: int = 0) -> pd.DataFrame:
    """All of ``table`` when ``max_rows`` is 0 or not smaller, else about ``max_rows`` rows with
    the same share of each label."""
    if max_rows <= 0 or max_rows >= len(table):
        return table.reset_index(drop=True)
    fraction = max_rows / len(table)
    return table.groupby("label", group_keys=False).sample(frac=fraction, random_state=seed).reset_index(drop=True)


# --------------------------------------------------------------------------- the record


def summary_metrics(
    headline: Headline,
    official: TrainResult,
    experts: MixtureTrainResult,
    ablation: pd.DataFrame | None = None,
    robustness: RobustnessResult | None = None,
) -> dict:
    """The key numbers of notebook 04 for ``run.record_metrics``."""
    table = headline.table
    values = {
        "test_auc": table["test_auc"].round(4).to_dict(),
        "official_split_test_auc": float(table.loc[table["role"] == OFFICIAL, "test_auc"].iloc[0]),
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
    return values
