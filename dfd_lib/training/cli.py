"""``dfd train``: train one expert, or one expert per re-split and their mixture, from a config file.

The same under ``accelerate launch -m dfd_lib.training.cli ...`` on several GPUs; notebook 04 writes
these commands for its own trainings (``experts/launch/``). On a machine without GPUs,
``accelerate launch --multi_gpu --num_processes N`` starts N CPU processes that train together
over gloo (``--cpu`` alone runs one process unless MPI is set up).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml
from accelerate import PartialState

from dfd_lib.core.commands import run_command
from dfd_lib.data.manifest import Manifest
from dfd_lib.data.resplit_table import load_resplits
from dfd_lib.training.mixture_training import train_mixture
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import train_expert

log = logging.getLogger(__name__)


def _read_config_file(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        return yaml.safe_load(text) or {}
    return json.loads(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML/JSON with TrainConfig fields (nested 'loss' and 'augment')")
    parser.add_argument("--table", type=Path, help="re-split CSV (notebook 02): one expert per resplit_<i>, then the mixture")
    parser.add_argument("--resplits", type=int, nargs="*", help="which re-splits (default: all)")
    parser.add_argument("--train-table", type=Path, help="manifest CSV to train one expert on")
    parser.add_argument("--val-table", type=Path, help="manifest CSV to validate it on")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--no-resume", action="store_true", help="start over even if out-dir holds a training state")


def run(args: argparse.Namespace) -> int:
    if args.table is None and (args.train_table is None or args.val_table is None):
        log.error("dfd train: give --table, or --train-table and --val-table")
        return 2

    try:
        config = TrainConfig.from_dict(_read_config_file(args.config) if args.config else {})
        if args.table is not None:
            result = train_mixture(load_resplits(args.table), config, args.out_dir, args.resplits, resume=not args.no_resume)
            lines = [result.summary.to_string(index=False), f"mixture written to {result.directory}"]
        else:
            expert = train_expert(Manifest.load(args.train_table).table, Manifest.load(args.val_table).table, config,
                                  args.out_dir, resume=not args.no_resume)
            lines = [f"best epoch {expert.best_epoch + 1}: val AUC {expert.best_val_auc:.4f}; weights {expert.best_weights}"]
    except (ValueError, FileNotFoundError) as exc:
        log.error("dfd train: %s", exc)
        return 1
    state = PartialState()
    if state.is_main_process:
        print("\n".join(lines))
    state.destroy_process_group()  # under accelerate launch: every process leaves the group before exiting
    return 0


if __name__ == "__main__":
    sys.exit(run_command(sys.modules[__name__], "train", sys.argv[1:]))
