"""``dfd export WEIGHTS_DIR --format openvino|onnx [--int8 --calibration PATH...]``: convert a mixture
for a CPU runtime ahead of time (:mod:`dfd_lib.scoring.export`, int8: :mod:`dfd_lib.scoring.quantize`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dfd_lib.models.checkpoints import CheckpointError
from dfd_lib.scoring.backends import BackendUnavailable
from dfd_lib.scoring.export import EXPORTS_DIR, FORMATS, ensure_export
from dfd_lib.scoring.quantize import ensure_int8_export

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, metavar="WEIGHTS_DIR", help="the mixture: ours or the released weight.pth + ema.state")
    parser.add_argument("--format", choices=FORMATS, default="openvino", help="openvino (IR) or onnx (for onnxruntime) (default: openvino)")
    parser.add_argument("--out", type=Path, default=None, help=f"folder holding the exports (default: WEIGHTS_DIR/{EXPORTS_DIR})")
    parser.add_argument("--backbones", default=None,
                        help="released format only: comma-separated timm names of the experts (default: the released 7)")
    parser.add_argument("--force", action="store_true", help="convert again even when an up-to-date export exists")
    parser.add_argument("--int8", action="store_true",
                        help="also write an int8 OpenVINO model calibrated on --calibration (changes scores; never the default)")
    parser.add_argument("--calibration", nargs="+", default=None, metavar="PATH",
                        help="with --int8: images, folders or globs to calibrate on (a few hundred of the data you score)")
    parser.add_argument("--calibration-size", type=int, default=300, help="with --int8: most images used (default: 300)")


def run(args: argparse.Namespace) -> int:
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()] if args.backbones else None
    if args.int8 and (args.format != "openvino" or not args.calibration):
        log.error("dfd export: --int8 needs --format openvino and --calibration PATH...")
        return 2
    try:
        export = ensure_export(args.weights, args.format, args.out, backbones, force=args.force)
        identity = export.meta["identity"]
        cost = f", converted in {export.meta['seconds']:.0f} s" if export.converted else ""
        print(f"{'wrote' if export.converted else 'up to date:'} {export.model_file} "
              f"({identity['runtime']}, {identity['image_size']} px{cost})")
        if args.int8:
            int8 = ensure_int8_export(args.weights, args.calibration, args.out, backbones, args.calibration_size, force=args.force)
            print(f"{'wrote' if int8.converted else 'up to date:'} {int8.model_file} (int8: scores change; "
                  f"calibrated on {int8.meta['calibration_images']} images)")
    except (BackendUnavailable, CheckpointError, ValueError) as exc:
        log.error("dfd export: %s", exc)
        return 2
    return 0
