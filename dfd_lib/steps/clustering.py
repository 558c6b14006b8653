"""Step 02, clusters and re-splits: :class:`ClusterSplitConfig`, notebook 02's one config, and
``dfd cluster``, which does what the notebook does without its figures: read the run's embeddings
(step 01), sweep K by silhouette, cluster, build the leave-one-cluster-out re-splits, check that no
group lies on both sides, and write the run's ``resplits.csv``.

Also ``python -m dfd_lib.steps.clustering ...``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from dfd_lib.core import config as configs
from dfd_lib.core import runs
from dfd_lib.core.commands import run_command
from dfd_lib.core.config import StepConfig, check_fields, is_int
from dfd_lib.core.paths import resolve
from dfd_lib.data.manifest import TRAIN, VAL
from dfd_lib.data.resplit_table import check_no_group_leakage, resplit_columns, save_resplits
from dfd_lib.embed.clusters import ClusterConfig, cluster_label_counts, silhouette_sweep
from dfd_lib.embed.embedding_store import load_run_embeddings
from dfd_lib.embed.resplits import build_resplits

log = logging.getLogger(__name__)


@dataclass
class ResplitPanelsConfig(StepConfig):
    """Notebook 02's figure of the re-splits in the UMAP plane."""

    panels: int = 4  # re-splits drawn as train/val panels

    def __post_init__(self) -> None:
        check_fields(self, [("panels", is_int(self.panels) and self.panels >= 1, "an int >= 1")])


@dataclass
class ClusterSplitConfig(StepConfig):
    """Notebook 02: how the embeddings are clustered into re-splits, and how many of them are drawn."""

    clusters: ClusterConfig = field(default_factory=ClusterConfig)
    figure: ResplitPanelsConfig = field(default_factory=ResplitPanelsConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder holding step 01's manifest.csv and embeddings (dfd embed)")
    configs.add_arguments(parser, ClusterConfig)


def run(args: argparse.Namespace) -> int:
    try:
        config = ClusterConfig.from_params(vars(args))
        if not resolve(args.run_dir).is_dir():
            raise FileNotFoundError(f"no run folder {resolve(args.run_dir)}: make one with dfd embed --run-dir {args.run_dir}")
        run_dir = runs.open_run(args.run_dir)
        result = load_run_embeddings(run_dir)
    except (ValueError, FileNotFoundError) as exc:
        log.error("dfd cluster: %s", exc)
        return 2
    trainval = result.select(splits=[TRAIN, VAL])
    try:
        sweep = silhouette_sweep(trainval.embeddings, ks=config.sweep_ks, seed=config.seed)
        k = config.chosen_k(sweep)
        table = build_resplits(trainval.table, trainval.embeddings, k, seed=config.seed,
                               merge_single_class=config.merge_single_class)
        check_no_group_leakage(table)
    except ValueError as exc:  # more clusters than images, a single cluster left after merging, ...
        log.error("dfd cluster: %s", exc)
        return 1
    path = save_resplits(table, run_dir.path(runs.RESPLITS))
    print(sweep.to_string(index=False))
    print(f"K = {k} ({'given' if config.n_clusters else 'best silhouette'}) on {len(trainval)} train/val images")
    print(cluster_label_counts(table).to_string())
    print(f"{len(resplit_columns(table))} re-splits, no group on both sides -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], "cluster", sys.argv[1:]))
