"""``dfd augment``: generate notebook 03's images into a run folder, with every option the notebook has.

Also ``accelerate launch -m dfd_lib.synth.cli ...`` to split the work between GPUs (or CPU
processes); notebook 03 with the same settings then finds every image already made and writes
the augmented manifest.
"""
from __future__ import annotations

import argparse
import logging
import sys

from accelerate import PartialState

from dfd_lib.core import config as configs
from dfd_lib.core import runs
from dfd_lib.core.commands import run_command
from dfd_lib.core.paths import resolve
from dfd_lib.data.resplit_table import load_resplits
from dfd_lib.synth.config import EnrichmentConfig
from dfd_lib.synth.enrichment import enrich_dataset
from dfd_lib.synth.failure_budget import FailureBudgetExceeded
from dfd_lib.synth.summary import family_counts

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder holding resplits.csv (from notebook 02)")
    parser.add_argument("--out-dir", default="", help="output folder (default: <run>/augmented)")
    configs.add_arguments(parser, EnrichmentConfig)


def run(args: argparse.Namespace) -> int:
    try:
        run_dir = runs.open_run(args.run_dir)
        config = EnrichmentConfig.from_params(vars(args))
        resplits = load_resplits(run_dir.require(runs.RESPLITS))
    except (ValueError, FileNotFoundError) as exc:
        log.error("dfd augment: %s", exc)
        return 2
    out = resolve(args.out_dir) if args.out_dir else run_dir.path(runs.AUGMENTED_DIR)
    try:
        rows, failures = enrich_dataset(resplits, config, out)
        over_budget = None
    except FailureBudgetExceeded as exc:  # every process gathered the same failures, so all of them get here
        over_budget = exc

    state = PartialState()
    if state.is_main_process:
        if over_budget is not None:
            log.error("dfd augment: %s", over_budget)
        else:
            print(family_counts(rows, failures, config).to_string())
            print(f"{len(rows)} images in {out}; {len(failures)} failed")
    state.wait_for_everyone()
    state.destroy_process_group()  # under accelerate launch: every process leaves the group before exiting
    return 1 if over_budget is not None else 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], "augment", sys.argv[1:]))
