"""The component ladder: what each ingredient of the method adds, one rung per ingredient, all on
the same cross-domain test split and at the same training budget (the experts' schedule).

0. a linear probe on notebook 01's frozen embeddings, when the headline has one: nothing trained here
   (:mod:`dfd_lib.evaluation.linear_probe`), scored by :mod:`dfd_lib.evaluation.ladder_results`;
1. official split, no enrichment, CE only: the naive fine-tuned baseline;
2. + the enrichment of notebook 03 (its images in training and validation);
3. + selection on a held-out cluster: one cluster expert instead of the official-split model;
4. + the NCE and KL losses: that expert as the method trains it;
5. + the mixture of the K cluster experts.

No model is trained twice: a rung takes a training the run already has when one exists with the
same training rows and the same settings (rung 3 is the loss ablation's CE-only run of the same
re-split when the ablation ran at the experts' schedule, rung 4 that re-split's expert, rung 5 the
mixture); only what is missing (at least rungs 1 and 2) is trained here, in ``out_dir``. With
``seeds`` > 1 every rung is trained again with the seeds after the run's (the mixture's K experts
included), and the spread across seeds is reported beside the bootstrap interval: the interval is
the test split's sampling noise for the run's own models, the spread the training's randomness.
Scoring and the figure are :mod:`dfd_lib.evaluation.ladder_results`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dfd_lib.data.resplit_table import resplit_column
from dfd_lib.evaluation.ablation import AblationResult, ablation_config
from dfd_lib.evaluation.comparison import expert_names, official_job
from dfd_lib.training.losses import loss_names
from dfd_lib.training.mixture_training import MixtureTrainResult, resplit_job
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import TrainResult
from dfd_lib.training.training_data import TrainingData
from dfd_lib.training.training_pool import TrainingJob, run_trainings

OFFICIAL_ROWS = "official"


@dataclass(frozen=True)
class Rung:
    number: int
    name: str  # what the model of this rung is, cumulatively
    adds: str  # what it adds over the rung below


# rung 0: no training, its scores are the headline's probe row (dfd_lib.evaluation.ladder_results)
PROBE_RUNG = Rung(0, "linear probe on frozen features",  # the headline names it with its backbone
                   "the naive baseline: a logistic regression on notebook 01's embeddings")
PROBE_SOURCE = "notebook 01's embeddings (no training)"
RUNGS = (
    Rung(1, "official split, CE only, no enrichment", "the backbone fine-tuned: the naive trained baseline"),
    Rung(2, "+ enrichment", "notebook 03's edited and generated images in training and validation"),
    Rung(3, "+ held-out-cluster selection", "one cluster expert: trained without its cluster, its epoch chosen on it"),
    Rung(4, "+ NCE and KL", "the contrastive and noise-consistency losses"),
    Rung(5, "+ mixture", "the mean of the cluster experts' fake-probabilities"),
)


@dataclass
class Training:
    """What decides a training: its rows, with or without notebook 03's images, and its settings."""

    rows: str  # OFFICIAL_ROWS (official train, selected on official val) or a re-split column: resplit_<i>
    enriched: bool  # with notebook 03's augmented rows
    config: TrainConfig

    def same_as(self, other: Training) -> bool:
        return (self.rows, self.enriched) == (other.rows, other.enriched) and self.config.same_run_as(other.config.to_dict())

    @property
    def folder(self) -> str:
        losses = "_".join(name for name in loss_names() if self.config.loss.weights[name] > 0)
        return f"{self.rows}_{losses}" + ("" if self.enriched else "_no_enrichment")


@dataclass
class Known:
    training: Training
    result: TrainResult
    label: str  # which model of the run it is, or "trained for the ladder"


@dataclass
class LadderTrainings:
    """The trainings behind every rung, for each seed."""

    resplit: int  # the re-split whose expert stands on rungs 3 and 4
    seeds: list[int]
    rungs: list[dict[int, list[TrainResult]]]  # per seed: rung number -> its training(s) (the mixture: K)
    sources: list[dict[int, str]]  # per seed: rung number -> where its training(s) came from
    trained: list[TrainResult]  # the trainings made here (all others were the run's)
    seconds: float

    @property
    def enabled(self) -> bool:
        return bool(self.seeds)

    def summary(self) -> pd.DataFrame:
        """One row per (seed, rung): the model and where its training came from."""
        rows = [{"seed": seed, "rung": rung.number, "model": rung.name, "trainings": len(models[rung.number]),
                 "from": sources[rung.number]}
                for seed, models, sources in zip(self.seeds, self.rungs, self.sources) for rung in RUNGS]
        return pd.DataFrame(rows, columns=["seed", "rung", "model", "trainings", "from"])


def ce_only(config: TrainConfig) -> TrainConfig:
    """``config`` with only the cross-entropy loss, at the same schedule (the loss ablation's CE-only variant)."""
    return ablation_config(config, ("ce",))


def rung_trainings(configs: Sequence[TrainConfig], resplits: Sequence[int], resplit: int, seed: int,
                   enriched: bool) -> dict[int, list[Training]]:
    """Rung number -> the trainings it needs at ``seed``: ``configs`` are the experts' (one per
    re-split of ``resplits``); the expert of ``resplit`` sets rungs 1-4's settings."""
    configs = [dataclasses.replace(c, seed=seed) for c in configs]
    own = configs[list(resplits).index(resplit)]
    column = resplit_column(resplit)
    return {
        1: [Training(OFFICIAL_ROWS, False, ce_only(own))],
        2: [Training(OFFICIAL_ROWS, enriched, ce_only(own))],
        3: [Training(column, enriched, ce_only(own))],
        4: [Training(column, enriched, own)],
        5: [Training(resplit_column(i), enriched, c) for i, c in zip(resplits, configs)],
    }


def known_trainings(data: TrainingData, official: TrainResult, experts: MixtureTrainResult,
                    ablated: AblationResult | None) -> list[Known]:
    """The trainings the run already has, described as :class:`Training` s."""
    enriched = data.augmented > 0
    known = [Known(Training(OFFICIAL_ROWS, enriched, official.config), official, "the official-split model")]
    for name, i, result in zip(expert_names(experts), experts.summary["resplit"], experts.experts):
        known.append(Known(Training(resplit_column(int(i)), enriched, result.config), result, name))
    for variant, result in (ablated.results.items() if ablated is not None else ()):
        known.append(Known(Training(resplit_column(ablated.resplit), enriched, result.config), result,
                           f"loss ablation: {variant}"))
    return known


def _job(data: TrainingData, training: Training, out_dir: Path, resume: bool) -> TrainingJob:
    table = data.trainval if training.enriched else data.trainval[~data.trainval["augmented"].astype(bool)]
    if training.rows == OFFICIAL_ROWS:
        return official_job(table, training.config, out_dir, resume)
    return resplit_job(table, int(training.rows.removeprefix("resplit_")), training.config, out_dir, resume)


def train_ladder(
    data: TrainingData,
    configs: Sequence[TrainConfig],
    official: TrainResult,
    experts: MixtureTrainResult,
    ablated: AblationResult | None,
    out_dir: str | Path,
    resplit: int | None = None,
    seeds: int = 1,
    resume: bool = True,
    processes: int = 1,
) -> LadderTrainings:
    """Every rung's trainings for ``seeds`` seeds (the experts' seed, then the next ones), reusing
    the run's trainings (``official``, ``experts`` trained with ``configs``, the ``ablated``
    variants) and training only what is missing, in ``out_dir/seed_<s>/<rows>_<losses>``.
    ``resplit`` (default: the first expert's) is the re-split of rungs 3 and 4. ``seeds=0`` trains
    nothing and returns an empty ladder. ``processes`` > 1 trains that many of the missing models at once
    (:mod:`dfd_lib.training.training_pool`)."""
    resplits = [int(i) for i in experts.summary["resplit"]]
    resplit = resplits[0] if resplit is None else int(resplit)
    if resplit not in resplits:
        raise ValueError(f"re-split {resplit} has no expert; the experts cover re-splits {resplits}")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 0:
        raise ValueError(f"ladder seeds must be an int >= 0 (0 skips the ladder), got {seeds!r}")
    if len(configs) != len(resplits):
        raise ValueError(f"{len(configs)} configs for {len(resplits)} experts")
    started = time.perf_counter()
    known = known_trainings(data, official, experts, ablated)
    first = configs[0].seed
    result = LadderTrainings(resplit=resplit, seeds=[first + k for k in range(seeds)], rungs=[], sources=[], trained=[],
                             seconds=0.0)
    needed = {seed: rung_trainings(configs, resplits, resplit, seed, data.augmented > 0) for seed in result.seeds}
    missing = _missing([t for rungs in needed.values() for trainings in rungs.values() for t in trainings], known)
    jobs = [_job(data, training, Path(out_dir) / f"seed_{training.config.seed}" / training.folder, resume)
            for training in missing]
    for training, trained in zip(missing, run_trainings(jobs, processes)):
        known.append(Known(training, trained, "trained for the ladder"))
        result.trained.append(trained)
    for seed in result.seeds:
        found = {number: [_find(training, known) for training in trainings] for number, trainings in needed[seed].items()}
        result.rungs.append({number: [k.result for k in ks] for number, ks in found.items()})
        result.sources.append({number: _describe(ks) for number, ks in found.items()})
    result.seconds = time.perf_counter() - started
    return result


def _missing(trainings: list[Training], known: list[Known]) -> list[Training]:
    """The trainings neither ``known`` nor listed before, in order."""
    missing: list[Training] = []
    for training in trainings:
        if not any(k.training.same_as(training) for k in known) and not any(m.same_as(training) for m in missing):
            missing.append(training)
    return missing


def _find(training: Training, known: list[Known]) -> Known:
    return next(k for k in known if k.training.same_as(training))


def _describe(found: list[Known]) -> str:
    labels = [k.label for k in found]
    if len(labels) == 1:
        return labels[0]
    new = labels.count("trained for the ladder")
    return {0: f"the run's {len(labels)} experts", len(labels): f"{new} experts trained for the ladder"}.get(
        new, f"{len(labels) - new} of the run's experts, {new} trained for the ladder")
