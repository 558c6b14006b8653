"""``dfd predict PATH...``: score image files, folders (recursively) and globs into a CSV.

Unreadable files are listed with their reason on stderr and in the CSV's ``error`` column;
the exit code is non-zero only when nothing could be scored.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dfd_lib.modeling.checkpoints import PREPROCESS_MODES, CheckpointError
from dfd_lib.scoring.inputs import expand_inputs
from dfd_lib.scoring.predictor import DEFAULT_WEIGHTS_DIR, Predictor

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR,
                        help=f"checkpoint folder: ours or the released weight.pth + ema.state (default: {DEFAULT_WEIGHTS_DIR})")
    parser.add_argument("--out", type=Path, default=Path("preds.csv"), help="CSV to write (default: preds.csv)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="default",
                        help="'compat' decodes with OpenCV exactly like the original release (default: default)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")


def run(args: argparse.Namespace) -> int:
    paths, problems = expand_inputs(args.paths)
    for problem in problems:
        log.warning("dfd predict: %s", problem)
    if not paths:
        log.error("dfd predict: nothing to score")
        return 1
    if not Path(args.weights).is_dir():
        log.error("dfd predict: weights folder %s not found; convert the released weights with "
                  "`dfd convert-weights SRC %s` or pass --weights DIR", args.weights, DEFAULT_WEIGHTS_DIR)
        return 2
    try:
        predictor = Predictor.load(args.weights, device=args.device, batch_size=args.batch_size,
                                   threads=args.threads, preprocess=args.preprocess)
    except (CheckpointError, ValueError) as exc:
        log.error("dfd predict: %s", exc)
        return 2
    table = predictor.predict_paths(paths, progress=True)
    failed = table[table["error"] != ""]
    for row in failed.itertuples():
        log.warning("dfd predict: skipped %s: %s", row.path, row.error)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    scored = len(table) - len(failed)
    print(f"scored {scored} of {len(table)} images -> {out}" + (f" ({len(failed)} unreadable)" if len(failed) else ""))
    return 0 if scored else 1
