"""Step 01, the dataset and its embeddings: :class:`FeaturesConfig`, notebook 01's one config, and
``dfd embed``, which does what the notebook's first cells do: read the dataset into the run's
``manifest.csv`` and embed it into the run's cache (``embeddings/``), which step 02 clusters.

Also ``python -m dfd_lib.steps.features ...``. Under ``accelerate launch --num_processes N -m
dfd_lib.cli embed ...`` (``WORLD_SIZE`` > 1) process 0 writes the manifest, every process embeds
every N-th row on its own GPU (or its share of the CPU's cores) and process 0 merges the parts into
the same cache entry one process writes (:mod:`dfd_lib.embed.embedding_parts`); run again after a
kill, it embeds only the parts not finished.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

import torch

from dfd_lib.core import config as configs
from dfd_lib.core import runs
from dfd_lib.core.commands import run_command
from dfd_lib.core.config import StepConfig
from dfd_lib.core.shards import ShardGroup, world_size
from dfd_lib.data.manifest import Manifest
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
    if world_size() == 1:
        return _run(args, None)
    # under accelerate launch / torchrun: each process embeds its share, process 0 merges (embedding_parts.py)
    shards = ShardGroup(vars(args).get("device"))
    try:
        return _run(args, shards)
    finally:
        shards.close()


def _run(args: argparse.Namespace, shards: ShardGroup | None) -> int:
    main = shards is None or shards.is_main
    error, manifest = None, None
    try:
        config = FeaturesConfig.from_params(vars(args))
        run_dir = runs.open_run(args.run_dir)
        if main:
            manifest = prepare_run_dataset(run_dir, config.dataset)
    except (ValueError, FileNotFoundError) as exc:
        error = str(exc)
    if shards is not None:  # also the barrier: the manifest is written before the others read it
        error = shards.first_error(error)
    if error:
        if main:
            log.error("dfd embed: %s", error)
        return 2
    if manifest is not None:
        print(manifest.summary().to_string())
        print(f"{len(manifest.table)} images -> {run_dir.path(runs.MANIFEST)}; {len(manifest.skipped)} files skipped")
    table = manifest.table if manifest is not None else Manifest.load(run_dir.path(runs.MANIFEST)).table
    if shards is not None and shards.threads(None) is not None:
        torch.set_num_threads(shards.threads(None))  # the CPU's cores shared between the processes
    try:
        result = embed_run(run_dir, table, config.embedding, shards=shards)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # a backbone or weights that cannot load, no decodable image
        if main:
            log.error("dfd embed: %s", exc)
        return 1
    if main:
        print(f"{len(result)} embeddings of width {result.embeddings.shape[1]}, "
              f"{'read from cache' if result.from_cache else 'computed'}; {len(result.failed)} images failed "
              f"-> {result.cache_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], "embed", sys.argv[1:]))
