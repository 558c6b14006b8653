"""The dataset of one run (notebook 01): read whatever the user points at, give it train / val /
test splits, and write it as the run's ``manifest.csv`` for every later step.

``dataset`` may be ``"demo"`` (the embedded demo dataset, built offline if needed),
``"demo-smoke"`` (its small test size), a saved manifest CSV, a folder of ``real/``/``fake/``
trees, or a competition image folder with ``labels_csv``. Separate validation and test sets
(the competition's ``valset``, a cross-domain test set) can be given the same way. The run's
``dataset.json`` records the names given and whether the images trained on are the built-in demo,
so the mixture notebook 04 trains says what it was trained on (:mod:`dfd_lib.models.demo_weights`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dfd_lib.core import runs
from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.config import StepConfig
from dfd_lib.core.paths import resolve
from dfd_lib.data.manifest import SPLITS, TEST, TRAIN, VAL, Manifest, content_digest
from dfd_lib.data.readers import read_dataset
from dfd_lib.models.demo_weights import TRAINED_ON, demo_provenance
from dfd_lib.sources.demo import SMOKE_SIZE, DemoConfig, demo_dir_for, ensure_demo_dataset

DEMO_NAMES = ("demo", "demo-smoke")
log = logging.getLogger(__name__)


@dataclass
class DatasetSpec(StepConfig):
    """Where the run's images come from."""

    dataset: str = "demo"  # demo, demo-smoke, a manifest .csv, a real/fake folder, or a competition image folder
    labels_csv: str = ""  # competition img_name,target CSV for `dataset`
    val_dataset: str = ""  # optional separate validation set (same forms)
    val_labels_csv: str = ""
    test_dataset: str = ""  # optional cross-domain test set (same forms)
    test_labels_csv: str = ""
    demo_size: int = 2000  # images in the demo dataset (when dataset == "demo")
    val_fraction: float = 0.2  # random official val share, used only when no split is given
    max_images: int = 0  # 0 = all; else a random, label-stratified subset (quick looks)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("dataset is empty: give 'demo', a manifest .csv, or a dataset folder")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_images < 0 or self.demo_size < 20:
            raise ValueError("max_images must be >= 0 and demo_size >= 20")


def _read(dataset: str, labels_csv: str, split: str | None, spec: DatasetSpec) -> Manifest:
    if dataset in DEMO_NAMES:
        size = SMOKE_SIZE if dataset == "demo-smoke" else spec.demo_size
        return ensure_demo_dataset(DemoConfig(n_images=size, seed=spec.seed), demo_dir_for(size))
    kwargs = {"split": split} if labels_csv else {}
    manifest = read_dataset(resolve(dataset), labels_csv=resolve(labels_csv) if labels_csv else None, **kwargs)
    if split and not labels_csv:
        manifest.table["split"] = split
    return manifest


def _subsample(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if not n or n >= len(table):
        return table
    fraction = n / len(table)
    return table.groupby(["split", "label"], group_keys=False).apply(
        lambda part: part.sample(max(1, int(round(len(part) * fraction))), random_state=seed)
    ).reset_index(drop=True)


def official_split(table: pd.DataFrame, val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """A copy of ``table`` with a random train/val ``split`` by group, stratified by the labels
    a group holds (for datasets that come without one). Rows already in ``test`` stay there."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    out = table.copy()
    is_test = out["split"].eq(TEST) if "split" in out.columns else pd.Series(False, index=out.index)
    pool = out[~is_test.fillna(False).astype(bool)]
    strata = pool.groupby("group")["label"].agg(lambda s: "+".join(map(str, sorted(s.unique()))))
    rng = np.random.default_rng(seed)
    val_groups: set = set()
    for _, groups in strata.groupby(strata):
        names = groups.index.to_numpy()[rng.permutation(len(groups))]
        val_groups.update(names[: int(round(val_fraction * len(names)))])
    out.loc[pool.index, "split"] = np.where(pool["group"].isin(val_groups), VAL, TRAIN)
    return out


def prepare_run_dataset(run: runs.RunDir, spec: DatasetSpec) -> Manifest:
    """Read the dataset(s), settle the splits, write ``run/manifest.csv`` and return it."""
    main = _read(spec.dataset, spec.labels_csv, TRAIN if spec.val_dataset else None, spec)
    run.record_input(spec.dataset, content_digest(main.table))
    parts, skipped = [main.table], [main.skipped]
    for extra, labels, split in ((spec.val_dataset, spec.val_labels_csv, VAL),
                                 (spec.test_dataset, spec.test_labels_csv, TEST)):
        if extra:
            manifest = _read(extra, labels, split, spec)
            run.record_input(extra, content_digest(manifest.table))
            manifest.table["split"] = split
            parts.append(manifest.table)
            skipped.append(manifest.skipped)
    table = pd.concat(parts, ignore_index=True)
    table = table.drop_duplicates("path").reset_index(drop=True)
    split = table["split"].astype(object).where(table["split"].isin(SPLITS))
    table["split"] = split
    if not split.isin([TRAIN, VAL]).any():
        table = official_split(table, spec.val_fraction, spec.seed)
    elif split.isna().any():
        log.warning("%d images have no split: they go to train", int(split.isna().sum()))
        table["split"] = split.fillna(TRAIN)
    table = _subsample(table, spec.max_images, spec.seed)
    if not (table["split"] == TEST).any():
        log.warning("this dataset has no 'test' split; give test_dataset for a cross-domain test "
                    "(the headline table needs one)")
    manifest = Manifest(table, pd.concat(skipped, ignore_index=True))
    write_dataset_record(run, spec)
    manifest.save(run.path(runs.MANIFEST))
    return manifest


TRAINING_PARTS = ("dataset", "val_dataset")  # the parts whose images the models train and select on


def write_dataset_record(run: runs.RunDir, spec: DatasetSpec) -> dict:
    """Write ``run/dataset.json``: each part's name as given, and ``demo``: whether the images trained
    on (``dataset``, ``val_dataset``) include the built-in demo."""
    parts = {name: getattr(spec, name) for name in (*TRAINING_PARTS, "test_dataset")}
    record = {"parts": parts, "demo": any(parts[name] in DEMO_NAMES for name in TRAINING_PARTS)}
    atomic_write(run.path(runs.DATASET), lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return record


def dataset_provenance(run: runs.RunDir) -> dict[str, str]:
    """What a mixture trained on ``run``'s images records of them (``trained_on``, and ``demo_weights``
    for the built-in demo); ``{}`` for a run folder written before ``dataset.json`` existed."""
    path = run.path(runs.DATASET)
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    if record.get("demo"):
        return demo_provenance()
    names = [record["parts"].get(name) for name in TRAINING_PARTS]
    return {TRAINED_ON: ", ".join(name for name in names if name)}
