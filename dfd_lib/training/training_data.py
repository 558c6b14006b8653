"""What notebook 04 trains on and with: the run's train/val rows with the augmented rows on their
sources' sides (:class:`TrainingData`), one training config per expert, and the files that let
``accelerate launch`` train them on several GPUs."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dfd_lib.core import runs
from dfd_lib.core.paths import resolve
from dfd_lib.data.manifest import FAKE, REAL, TEST, TRAIN, VAL, Manifest
from dfd_lib.data.resplit_table import attach_to_resplits, load_resplits, resplit_column, resplit_indices, save_resplits
from dfd_lib.sources.run_dataset import dataset_provenance
from dfd_lib.training.loss_terms import loss_summary_names
from dfd_lib.training.train_config import TrainConfig

OFFICIAL_DIR = "official_split"  # the official-split model's folder, beside expert_<i>/ in the experts folder


@dataclass
class TrainingData:
    """What notebook 04 trains and tests on, read from the run folder."""

    trainval: pd.DataFrame  # train/val rows + attached augmented rows (column ``augmented``); split, cluster, resplit_<i>
    test: pd.DataFrame  # the manifest's cross-domain test rows
    resplits: list[int]  # the re-splits that get an expert
    augmented: int  # augmented rows in ``trainval``
    note: str  # where the augmented rows come from, or why there are none
    provenance: dict[str, str] = field(default_factory=dict)  # what the images are (01's dataset.json), for the mixture

    def summary(self) -> pd.DataFrame:
        """Reals and fakes (and augmented images) on each side of every split."""
        sides = {"official train": self.trainval["split"].eq(TRAIN), "official val": self.trainval["split"].eq(VAL)}
        for i in self.resplits:
            column = self.trainval[resplit_column(i)]
            sides[f"{resplit_column(i)} train"] = column.eq(TRAIN)
            sides[f"{resplit_column(i)} val (cluster {i})"] = column.eq(VAL)
        rows = {name: _counts(self.trainval[mask.fillna(False).astype(bool)]) for name, mask in sides.items()}
        rows["test (cross-domain)"] = _counts(self.test)
        return pd.DataFrame.from_dict(rows, orient="index")


def _counts(table: pd.DataFrame) -> dict:
    augmented = table["augmented"] if "augmented" in table.columns else pd.Series(False, index=table.index)
    return {"real": int((table["label"] == REAL).sum()), "fake": int((table["label"] == FAKE).sum()),
            "augmented": int(augmented.fillna(False).astype(bool).sum()), "total": int(len(table))}


def load_training_data(run: runs.RunDir, use_augmented: bool = True, max_experts: int = 0) -> TrainingData:
    """The manifest (01), re-splits (02) and, if present and wanted, the augmented rows (03)
    of ``run`` (a :class:`dfd_lib.core.runs.RunDir`), the augmented rows re-attached to their
    sources' sides of every re-split (:func:`dfd_lib.data.resplit_table.attach_to_resplits`, which also
    checks for leakage). ``max_experts`` > 0 keeps the first re-splits only. ``provenance`` says what
    the images are (:func:`dfd_lib.sources.run_dataset.dataset_provenance`; empty for a run folder
    written before 01 recorded it)."""
    manifest = Manifest.load(run.require(runs.MANIFEST)).table
    resplits = load_resplits(run.require(runs.RESPLITS))
    test = manifest[manifest["split"].astype(str) == TEST].reset_index(drop=True)
    if test.empty:
        raise ValueError("the manifest has no 'test' rows: the headline comparison needs a cross-domain test split "
                         "(notebook 01's test_dataset)")
    if max_experts < 0:
        raise ValueError(f"max_experts must be >= 0, got {max_experts}")
    chosen = resplit_indices(resplits)
    chosen = chosen[:max_experts] if max_experts else chosen
    augmented_path = run.path(runs.AUGMENTED_MANIFEST)
    parts = [resplits.assign(augmented=False)]
    if not use_augmented:
        note = "use_augmented is off: training on the original train/val images only"
    elif not augmented_path.is_file():
        note = (f"no {runs.AUGMENTED_MANIFEST} in the run folder (notebook 03 was skipped): "
                "training on the original train/val images only")
    else:
        attached = attach_to_resplits(resplits, Manifest.load(augmented_path).table)
        parts.append(attached.assign(augmented=True))
        note = (f"{len(attached)} augmented images from notebook 03, each on its source's side of every split"
                + (f" ({attached.attrs['dropped']} dropped: source in no re-split)" if attached.attrs.get("dropped") else ""))
    trainval = pd.concat(parts, ignore_index=True)
    trainval["group"] = trainval["group"].astype(str)
    return TrainingData(trainval=trainval, test=test, resplits=chosen, augmented=int(trainval["augmented"].sum()), note=note,
                        provenance=dataset_provenance(run))


def expert_configs(base: TrainConfig, backbones: Sequence[str], backbone_weights: Sequence[str] | str, count: int,
                   tunings: Sequence[str] | str = ()) -> list[TrainConfig]:
    """``count`` copies of ``base``, the i-th with backbone ``backbones[i % len]``, local weights
    ``backbone_weights[i % len]`` ("" or an empty list: the package / random weights; relative paths
    are taken from the project root) and tuning ``tunings[i % len]`` (empty: ``base``'s, "full" by default).
    Fewer backbones than experts are cycled; more is an error (a backbone would never train), as are
    weights or tunings that are neither none, one nor one per backbone."""
    if isinstance(backbones, str) or not backbones:
        raise ValueError(f"backbones must be a non-empty list of timm names, got {backbones!r}")
    if len(backbones) > count:
        raise ValueError(f"{len(backbones)} backbones for {count} experts (one per re-split): {', '.join(backbones[count:])} "
                         f"would never train; give at most {count} backbones, or more clusters (02.n_clusters)")
    weights = _per_backbone("backbone_weights", backbone_weights, backbones)
    weights = [str(resolve(w)) if str(w) else "" for w in weights] or [""]
    modes = [str(t) for t in _per_backbone("tunings", tunings, backbones)] or [base.tuning]
    return [dataclasses.replace(base, backbone=str(backbones[i % len(backbones)]), weights_path=weights[i % len(weights)],
                                tuning=modes[i % len(modes)])
            for i in range(count)]


def _per_backbone(name: str, values: Sequence[str] | str, backbones: Sequence[str]) -> list:
    """``values`` as a list of none, one (for every backbone) or one per backbone; anything else is an error."""
    listed = [values] if isinstance(values, str) else list(values)
    if len(listed) not in (0, 1, len(backbones)):
        raise ValueError(f"{len(listed)} {name} for {len(backbones)} backbones: give none, one, or one per backbone")
    return listed


def configs_table(configs: Mapping[str, TrainConfig]) -> pd.DataFrame:
    """The settings that differ between runs, plus the main shared ones, one row per run (the loss:
    every registered term's weight and the options that set its cost, e.g. ``kl_fraction``)."""
    rows = {}
    for name, config in configs.items():
        d = config.to_dict()
        d.pop("loss")
        d.pop("augment")
        rows[name] = {**{k: d[k] for k in ("backbone", "weights_path", "tuning", "image_size", "epochs", "batch_size", "lr",
                                            "freeze_stages", "max_steps_per_epoch", "ema_decay")},
                      **{k: getattr(config.loss, k) for k in loss_summary_names()}}
    return pd.DataFrame.from_dict(rows, orient="index")


LAUNCH_DIR = "launch"  # under the experts folder


def write_launch_files(experts_dir: str | os.PathLike, data: TrainingData, configs: Sequence[TrainConfig],
                       official_config: TrainConfig) -> str:
    """Write what ``accelerate launch -m dfd_lib.training.cli`` (``dfd train``) needs to train this notebook's models
    on several GPUs into ``experts_dir/launch`` (the training table with the augmented rows,
    the official split's two tables, one config per training) and return the commands. Run
    them, then run the notebook again with ``resume`` on: it finds every training finished
    (same settings, same folders) and goes straight to scoring."""
    experts_dir = Path(experts_dir)
    launch = experts_dir / LAUNCH_DIR
    launch.mkdir(parents=True, exist_ok=True)
    table = save_resplits(data.trainval, launch / "trainval.csv")
    sides = data.trainval["split"].astype(str)
    official_train = Manifest(data.trainval[sides == TRAIN].reset_index(drop=True)).save(launch / "official_train.csv")
    official_val = Manifest(data.trainval[sides == VAL].reset_index(drop=True)).save(launch / "official_val.csv")
    lines = ["# each command trains on every GPU of the machine (add --num_processes N, --mixed_precision bf16 as you like)"]
    official_json = launch / "official_split.json"
    official_json.write_text(json.dumps(official_config.to_dict(), indent=2) + "\n", encoding="utf-8")
    lines.append(f"accelerate launch -m dfd_lib.training.cli --config {official_json} --train-table {official_train} "
                 f"--val-table {official_val} --out-dir {experts_dir / OFFICIAL_DIR}")
    for i, config in zip(data.resplits, configs):
        path = launch / f"expert_{i}.json"
        path.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        lines.append(f"accelerate launch -m dfd_lib.training.cli --config {path} --table {table} --resplits {i} --out-dir {experts_dir}")
    commands = "\n".join(lines) + "\n"
    (launch / "commands.sh").write_text(commands, encoding="utf-8")
    return commands
