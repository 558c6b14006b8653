"""The run directory: where one pipeline run keeps everything it makes.

Steps hand data to each other only through files here. The names of those files are
defined once, below, so notebooks, the pipeline and the report agree on them.

```
reports/<run>/
  params.json, environment.json      written by the pipeline (and timings.json, index.html)
  notebooks/NN_name.ipynb (.html)    executed copies
  manifest.csv                       01: the dataset of this run (split: train / val / test)
  dataset.json                       01: what it was read from (the names given, whether the built-in demo)
  embeddings/, umap.npy              01: cached embeddings (embeddings/run.json: the entry the map used), their 2-D map
  resplits.csv                       02: manifest + cluster + resplit_<i> columns
  augmented/, augmented_manifest.csv 03: generated images and their rows
  experts/, weights/moe/             04: every training (expert_<i>/, official_split/, launch/), the mixture (our format)
  figures/*.png                      every figure, also shown in the notebooks
  metrics.json                       every step's key numbers, by step
  fingerprints.json                  what each step last ran on (dfd status; dfd_lib.pipeline.fingerprints)
```

:data:`STEPS` is the step graph: each step's notebook, the run files it reads and writes, and the
parameters that name files outside the run folder. The chain, ``--from``/``--only``, the preflight,
the report, ``dfd status``, ``dfd rerun`` and ``dfd compare`` read it; step and file names are spelt
only here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.logs import setup_logging
from dfd_lib.core.paths import REPORTS_DIR, resolve

PARAMS = "params.json"
ENVIRONMENT = "environment.json"
TIMINGS = "timings.json"
REPORT_PAGE = "index.html"
MANIFEST = "manifest.csv"
DATASET = "dataset.json"  # the names of the run's datasets and whether they are the built-in demo (demo weights)
EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_INDEX = "embeddings/run.json"
UMAP_COORDS = "umap.npy"
RESPLITS = "resplits.csv"
AUGMENTED_DIR = "augmented"
AUGMENTED_MANIFEST = "augmented_manifest.csv"
MOE_WEIGHTS = "weights/moe"
EXPERTS_DIR = "experts"
FIGURES_DIR = "figures"
METRICS = "metrics.json"
TABLES_DIR = "tables"
NOTEBOOKS_DIR = "notebooks"
FINGERPRINTS = "fingerprints.json"
DIGEST_CACHE = ".digests.json"  # content digests of run files by size and mtime, so unchanged files are not read again


@dataclass(frozen=True)
class StepSpec:
    """One step of the method: notebook ``notebooks/<name>.ipynb``, what it reads and writes in the run folder."""

    name: str  # "01_features_umap": the notebook's stem, its section of metrics.json and timings.json
    reads: tuple[str, ...] = ()  # run files (or folders) written by earlier steps
    writes: tuple[str, ...] = ()  # run files (or folders) it makes, besides its figures, tables and metrics
    external: tuple[str, ...] = ()  # its parameters that name files outside the run folder (data, weights)

    @property
    def key(self) -> str:
        return self.name[:2]

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    def matches(self, token: str) -> bool:
        """``token`` ("04", "04_train_moe", "train_moe", "04_train_moe.ipynb") names this step."""
        token = token.strip()
        return token in (self.key, self.name, self.name[3:], self.notebook)


FEATURES = StepSpec("01_features_umap", writes=(MANIFEST, DATASET, EMBEDDINGS_DIR, UMAP_COORDS),
                    external=("dataset", "labels_csv", "val_dataset", "val_labels_csv", "test_dataset", "test_labels_csv",
                              "backbone_weights"))
CLUSTERS = StepSpec("02_cluster_split", reads=(MANIFEST, EMBEDDINGS_DIR, UMAP_COORDS), writes=(RESPLITS,))
AUGMENT = StepSpec("03_sd_augment", reads=(RESPLITS,), writes=(AUGMENTED_DIR, AUGMENTED_MANIFEST),
                   external=("sd_checkpoint", "sd_inpaint_checkpoint", "sd_single_file_config"))
TRAIN = StepSpec("04_train_moe", reads=(MANIFEST, DATASET, EMBEDDINGS_DIR, RESPLITS, AUGMENTED_DIR, AUGMENTED_MANIFEST),
                 writes=(EXPERTS_DIR, MOE_WEIGHTS),
                 external=("backbone_weights",))
INFERENCE = StepSpec("05_inference", reads=(MANIFEST, MOE_WEIGHTS), external=("weights_dir", "folder"))
STEPS: tuple[StepSpec, ...] = (FEATURES, CLUSTERS, AUGMENT, TRAIN, INFERENCE)


def step_spec(token: str) -> StepSpec:
    """The step ``token`` names (see :meth:`StepSpec.matches`)."""
    for step in STEPS:
        if step.matches(token):
            return step
    raise KeyError(f"unknown step {token!r}; steps are {', '.join(s.name for s in STEPS)}")


def producer(name: str) -> StepSpec:
    """The step that writes the run file ``name``."""
    for step in STEPS:
        if name in step.writes or any(name.startswith(f"{written}/") for written in step.writes):
            return step
    raise KeyError(f"no step writes {name!r}")


def upstream(step: StepSpec) -> list[StepSpec]:
    """The steps whose files ``step`` reads, in chain order."""
    return [producer_step for producer_step in STEPS if set(step.reads) & set(producer_step.writes)]


def read_params(run_dir: str | os.PathLike) -> dict:
    """The run's record (``params.json``: profile, overrides, each step's values), ``{}`` when it never ran."""
    path = Path(run_dir) / PARAMS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_params(run_dir: str | os.PathLike, record: dict) -> Path:
    path = Path(run_dir) / PARAMS
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    return path


# what a killed process leaves behind: atomic_write's temporary files, the embedding cache's partial array
TEMPORARY_PATTERNS = (".*.tmp", "*.partial.npy")


def remove_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed run left in ``run_dir`` (never read: a file becomes an
    artefact only by its final rename), so a resumed run starts clean; the paths deleted."""
    found = [p for pattern in TEMPORARY_PATTERNS for p in Path(run_dir).rglob(pattern) if p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


class MissingArtefactError(FileNotFoundError):
    """A step needs a file an earlier step writes; the message says which step."""


@dataclass(frozen=True)
class RunDir:
    """A run folder with helpers for the files the steps exchange."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    def require(self, name: str) -> Path:
        """The path of an artefact of an earlier step, or a clear error naming the step that writes it."""
        path = self.path(name)
        if not path.exists():
            made_by = producer(name)
            raise MissingArtefactError(
                f"{path} is missing: run step {made_by.name} first (dfd pipeline --run {self.root.name} --only {made_by.key})"
            )
        return path

    def figure(self, name: str) -> Path:
        path = self.root / FIGURES_DIR / (name if name.endswith(".png") else f"{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def table(self, name: str) -> Path:
        path = self.root / TABLES_DIR / (name if name.endswith(".csv") else f"{name}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save_table(self, frame: pd.DataFrame, name: str, index: bool = True) -> Path:
        path = self.table(name)
        frame.to_csv(path, index=index)
        return path

    def record_metrics(self, step: str, values: dict) -> dict:
        """Merge ``values`` into ``metrics.json`` under ``step`` (atomic write); returns all metrics."""
        path = self.root / METRICS
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        metrics.setdefault(step, {}).update(_jsonable(values))
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True)))
        return metrics

    def record_weights(self, step: str, sources: dict[str, str]) -> dict:
        """Record where each model of ``step`` started from (``name -> file:/package:/hub:/random``, see
        :mod:`dfd_lib.models.backbones`) in ``environment.json`` under ``weights`` / ``step``, replacing what
        an earlier run of that step recorded (a model it no longer has must not stay listed)."""
        path = self.root / ENVIRONMENT
        environment = json.loads(path.read_text()) if path.is_file() else {}
        environment.setdefault("weights", {})[step] = {str(k): str(v) for k, v in sources.items()}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(environment, indent=2)))
        return environment["weights"]

    def record_trainings(self, step: str, trainings: dict[str, dict]) -> dict:
        """Replace ``step``'s trainings in ``environment.json``: under ``trainings``, each one's record
        (starting weights, the fingerprints of its rows and settings), and under ``weights`` where each
        started from (what the report shows)."""
        self.record_weights(step, {name: record["weights"] for name, record in trainings.items()})
        path = self.root / ENVIRONMENT
        environment = json.loads(path.read_text())
        environment.setdefault("trainings", {})[step] = trainings
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(environment, indent=2)))
        return environment["trainings"]

    def record_input(self, name: str, digest: str) -> dict:
        """Merge the content digest of an input dataset (:func:`dfd_lib.data.manifest.content_digest`)
        into ``environment.json`` under ``inputs``: what ``dfd rerun`` checks a rerun reads again."""
        path = self.root / ENVIRONMENT
        environment = json.loads(path.read_text()) if path.is_file() else {}
        environment.setdefault("inputs", {})[str(name)] = digest
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(environment, indent=2)))
        return environment["inputs"]

    def metrics(self) -> dict:
        path = self.root / METRICS
        return json.loads(path.read_text()) if path.is_file() else {}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return json.loads(value.to_json(orient="split"))
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, Path):
        return str(value)
    return value


def open_run(run_dir: str | os.PathLike = "", default_name: str = "interactive") -> RunDir:
    """The run folder ``run_dir`` (relative paths are under the project root), or
    ``reports/<default_name>`` when it is empty, as when a notebook is opened by hand. Every
    notebook starts here, so this also shows the library's messages (:func:`dfd_lib.core.logs.setup_logging`)."""
    setup_logging()
    root = resolve(run_dir) if str(run_dir) else REPORTS_DIR / default_name
    root.mkdir(parents=True, exist_ok=True)
    return RunDir(root.resolve())
