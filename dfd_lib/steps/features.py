"""Step 01, the dataset and its embeddings: :class:`FeaturesConfig`, notebook 01's one config, and
``dfd embed``, which does what the notebook's first cells do: read the dataset into the run's
``manifest.csv`` and embed it into the run's cache (``embeddings/``), which step 02 clusters.

Also ``python -m dfd_lib.steps.features ...``, or ``accelerate launch -m dfd_lib.steps.features ...``
with one process (the embedding is not split between processes).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from dfd_lib.core import config as configs
from dfd_lib.core import runs
from dfd_lib.core.commands import run_command
from dfd_lib.core.config import StepConfig
from dfd_lib.embed.embeddings import EmbeddingConfig, embed_run
from dfd_lib.embed.projection import UmapConfig
from dfd_lib.sources.run_dataset import DatasetSpec, prepare_run_dataset

log = logging.getLogger(__name__)


@dataclass
class FeaturesConfig(StepConfig):
    """Notebook 01: where the images come from, how they are embedded, how their 2-D map is drawn
    (``seed`` feeds both the dataset's subsets and split and the map)."""

    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    umap: UmapConfig = field(default_factory=UmapConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder for manifest.csv and embeddings/ (relative: under the project root)")
    # the map is notebook 01's alone: the command takes the options of the dataset and embedding parts (seed included)
    map_only = set(UmapConfig.parameter_names()) - set(DatasetSpec.parameter_names()) - set(EmbeddingConfig.parameter_names())
    configs.add_arguments(parser, FeaturesConfig, exclude=map_only)


def run(args: argparse.Namespace) -> int:
    try:
        config = FeaturesConfig.from_params(vars(args))
        run_dir = runs.open_run(args.run_dir)
        manifest = prepare_run_dataset(run_dir, config.dataset)
    except (ValueError, FileNotFoundError) as exc:
        log.error("dfd embed: %s", exc)
        return 2
    print(manifest.summary().to_string())
    print(f"{len(manifest.table)} images -> {run_dir.path(runs.MANIFEST)}; {len(manifest.skipped)} files skipped")
    try:
        result = embed_run(run_dir, manifest.table, config.embedding)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # a backbone or weights that cannot load, no decodable image
        log.error("dfd embed: %s", exc)
        return 1
    print(f"{len(result)} embeddings of width {result.embeddings.shape[1]}, "
          f"{'read from cache' if result.from_cache else 'computed'}; {len(result.failed)} images failed "
          f"-> {result.cache_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], "embed", sys.argv[1:]))
