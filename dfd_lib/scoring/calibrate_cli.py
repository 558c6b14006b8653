"""``dfd calibrate DATA``: choose the mixture's verdict threshold on a labelled set and store it
in its ``config.json`` (:mod:`dfd_lib.scoring.calibration`), with the ROC and reliability figures.

DATA is a ``real/`` ``fake/`` folder tree or a manifest (``dfd manifest``, a run's
``manifest.csv`` / ``resplits.csv``); from a manifest every split but ``test`` is used unless
``--split`` names others. ``--check DATA2`` reports the rates at the new threshold on a labelled
test set (from a manifest: its ``test`` split) beside the target.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from dfd_lib.data.manifest import TEST, ManifestError
from dfd_lib.data.readers import read_dataset
from dfd_lib.models.checkpoints import PREPROCESS_MODES, CheckpointError, is_mixture_dir
from dfd_lib.scoring.calibration import DEFAULT_TARGET_FPR, RULES
from dfd_lib.scoring.default_weights import WeightsNotFound, find_weights
from dfd_lib.scoring.mixture_calibration import calibrate_mixture, selection_rows, summary_table
from dfd_lib.scoring.predictor import Predictor

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="labelled images: a real/ fake/ folder tree or a manifest .csv")
    parser.add_argument("--weights", type=Path, default=None,
                        help="the mixture to calibrate, in dfd-kit's format (default: weights/moe, else the most recent "
                             "run's under reports/, as dfd predict finds it)")
    parser.add_argument("--rule", choices=RULES, default="fpr",
                        help="fpr: the lowest threshold with at most --target-fpr of the reals called fake; "
                             "eer: the equal error rate's threshold (default: fpr)")
    parser.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR,
                        help=f"the false-positive rate the fpr rule allows (default: {DEFAULT_TARGET_FPR})")
    parser.add_argument("--split", default="",
                        help="comma-separated manifest splits to calibrate on (default: every split but test)")
    parser.add_argument("--selection", action="store_true",
                        help="only the rows on a re-split's held-out side (a run's resplits.csv): the data notebook 04 "
                             "selected its experts on")
    parser.add_argument("--check", default=None, metavar="DATA2",
                        help="a labelled test set: its FPR and TPR at the new threshold are reported beside the target")
    parser.add_argument("--check-split", default=TEST, help=f"the splits of a --check manifest to use (default: {TEST})")
    parser.add_argument("--out", type=Path, default=None, help="folder for the figures (default: the weights folder)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="default",
                        help="decoding, as `dfd predict --preprocess` will use it (default: default)")


def labelled_rows(spec: str, splits: str, exclude_test: bool, selection: bool = False) -> tuple[pd.DataFrame, str]:
    """The rows of DATA to use and a name for them. Folder trees have no splits: all their rows."""
    table = read_dataset(spec).table
    if selection:
        table = selection_rows(table)
    wanted = [name.strip() for name in splits.split(",") if name.strip()]
    has_splits = table["split"].notna().any()
    if wanted and has_splits:
        missing = sorted(set(wanted) - set(table["split"].dropna().astype(str)))
        if missing:
            raise ManifestError(f"{spec}: no rows in split(s) {missing}; splits: {sorted(set(table['split'].dropna()))}")
        table = table[table["split"].astype(str).isin(wanted)]
    elif exclude_test and has_splits:
        table = table[table["split"].astype(str) != TEST]
    if table.empty:
        raise ManifestError(f"{spec}: no labelled rows to use")
    if has_splits:
        spec = f"{spec} [{'held-out clusters of ' if selection else ''}{'+'.join(sorted(set(table['split'].astype(str))))}]"
    return table.reset_index(drop=True), spec


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.target_fpr < 1.0:
        log.error("dfd calibrate: --target-fpr must be in [0, 1), got %s", args.target_fpr)
        return 2
    try:
        args.weights, why = find_weights(args.weights)
    except WeightsNotFound as exc:
        log.error("dfd calibrate: %s", exc)
        return 2
    print(f"dfd calibrate: weights {why}" if why != "as given" else f"dfd calibrate: weights {args.weights}")
    if not is_mixture_dir(args.weights):
        log.error("dfd calibrate: %s is not a dfd-kit mixture (model.safetensors + config.json); pass --weights DIR, "
                  "or convert released weights first with `dfd convert-weights SRC DST`", args.weights)
        return 2
    try:
        rows, name = labelled_rows(args.data, args.split, exclude_test=True, selection=args.selection)
        check, check_name = labelled_rows(args.check, args.check_split, exclude_test=False) if args.check else (None, "")
        predictor = Predictor.load(args.weights, device=args.device, batch_size=args.batch_size, threads=args.threads,
                                   preprocess=args.preprocess)
        calibration = calibrate_mixture(args.weights, rows, args.target_fpr, args.rule, data=name, check=check,
                                        check_data=check_name, figures_dir=args.out or args.weights, predictor=predictor)
    except (ManifestError, CheckpointError, ValueError) as exc:
        log.error("dfd calibrate: %s", exc)
        return 2
    print(summary_table(calibration).to_string(float_format="{:.4f}".format))
    print(f"threshold {calibration.threshold:.4f} ({calibration.rule_text}) -> {Path(args.weights) / 'config.json'}; "
          f"figures: {Path(args.out or args.weights) / 'calibration_roc.png'}, calibration_reliability.png")
    print("dfd predict and dfd serve now give their verdicts at this threshold (--threshold overrides it)")
    return 0
