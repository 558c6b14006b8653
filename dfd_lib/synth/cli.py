"""``dfd augment``: generate notebook 03's images into a run folder, with every option the notebook has.

Also ``accelerate launch -m dfd_lib.synth.cli ...`` to split the work between GPUs (or CPU
processes); notebook 03 with the same settings then finds every image already made and writes
the augmented manifest.
"""
from __future__ import annotations

import argparse
import logging
import sys

from dfd_lib import config as configs
from dfd_lib.synth.config import EnrichmentConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder holding resplits.csv (from notebook 02)")
    parser.add_argument("--out-dir", default="", help="output folder (default: <run>/augmented)")
    configs.add_arguments(parser, EnrichmentConfig)


def run(args: argparse.Namespace) -> int:
    from dfd_lib.embed.resplits import load_resplits
    from dfd_lib.paths import resolve
    from dfd_lib.pipeline import runs
    from dfd_lib.synth.enrichment import enrich_dataset
    from dfd_lib.synth.summary import family_counts

    try:
        run_dir = runs.open_run(args.run_dir)
        config = EnrichmentConfig.from_params(vars(args))
        resplits = load_resplits(run_dir.require(runs.RESPLITS, "02_cluster_split"))
    except (ValueError, FileNotFoundError) as exc:
        log.error("dfd augment: %s", exc)
        return 2
    out = resolve(args.out_dir) if args.out_dir else run_dir.path(runs.AUGMENTED_DIR)
    rows, failures = enrich_dataset(resplits, config, out)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        print(family_counts(rows, failures).to_string())
        print(f"{len(rows)} images in {out}; {len(failures)} failed")
    state.wait_for_everyone()
    state.destroy_process_group()  # under accelerate launch: every process leaves the group before exiting
    return 0


if __name__ == "__main__":
    from dfd_lib.cli import main

    sys.exit(main(["augment", *sys.argv[1:]]))
