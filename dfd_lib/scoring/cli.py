"""``dfd predict PATH...``: score image and video files, folders (recursively) and globs into
a CSV, streamed (:mod:`dfd_lib.scoring.stream`): decoding in ``--workers`` processes, rows
appended as batches finish, ``--resume`` after a crash; ``--faces`` scores face-centred crops.

Unreadable files are listed with their reason on stderr and in the CSV's ``error`` column;
the exit code is non-zero only when nothing could be scored. Demo weights say so in the summary
and in every row's ``threshold_source`` (:mod:`dfd_lib.models.demo_weights`).

``--maps DIR`` writes each photo's localisation map (a mixture with heads, in torch) as a PNG into ``DIR`` and
names it in the CSV's ``map`` column; a mixture without heads, a converted backend or ``--faces`` is refused
before anything is scored (Grad-CAM, ``dfd_lib.scoring.explain``, is the map of a mixture without heads).

Under ``accelerate launch --num_processes N -m dfd_lib.cli predict ...`` the processes score a
share of the files each and process 0 merges them into the same CSV (:mod:`dfd_lib.scoring.sharding`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from dfd_lib.core.shards import world_size
from dfd_lib.models.checkpoints import PREPROCESS_MODES, CheckpointError
from dfd_lib.models.demo_weights import demo_notice
from dfd_lib.scoring.backends import BackendUnavailable, add_backend_arguments
from dfd_lib.scoring.calibration import resolve_threshold
from dfd_lib.scoring.default_weights import WeightsNotFound, find_weights
from dfd_lib.scoring.faces import add_face_arguments, face_options
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.scoring.sharding import Shards
from dfd_lib.scoring.stream import StreamOptions, score_stream
from dfd_lib.scoring.videos import DEFAULT_FRAMES

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image or video (mp4 avi mov webm mkv) files, folders (searched recursively) or globs")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint folder: ours or the released weight.pth + ema.state "
                             "(default: weights/moe, else the most recent run's under reports/)")
    parser.add_argument("--out", type=Path, default=Path("preds.csv"), help="CSV to write (default: preds.csv)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="default",
                        help="'compat' decodes with OpenCV exactly like the original release (default: default)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    add_backend_arguments(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding files (and finding faces) while the model runs; 0: none "
                             "(default: cores - 1, at most 3, from 64 files on; none below)")
    parser.add_argument("--resume", action="store_true", help="keep --out's rows and score only the files it lacks")
    parser.add_argument("--faces", action="store_true",
                        help="score face-centred crops: each face found, cropped square at --face-margin x its box; "
                             "no face found: the whole image (faces_found 0)")
    add_face_arguments(parser)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help=f"frames sampled evenly from each video (default: {DEFAULT_FRAMES})")
    parser.add_argument("--per-frame", action="store_true", help="also write one row per sampled video frame")
    parser.add_argument("--maps", type=Path, default=None, metavar="DIR",
                        help="write each photo's localisation map into DIR (8-bit greyscale PNG at the photo's size, "
                             "255 = edited; named in the CSV's map column; videos get none). Needs a mixture with "
                             "localisation heads (notebook 04 with mask_weight > 0), --backend torch and no --faces")
    parser.add_argument("--threshold", type=float, default=None,
                        help="verdict threshold, fake if prob_fake >= it (default: the mixture's from `dfd calibrate`, "
                             "else 0.5, 'not calibrated')")


def stream_options(args: argparse.Namespace) -> StreamOptions:
    faces = face_options(args) if args.faces else None
    return StreamOptions(faces=faces, frames=args.frames, per_frame=args.per_frame, workers=args.workers, maps_dir=args.maps)


def maps_backend_problem(args: argparse.Namespace) -> str | None:
    """Why ``--maps`` cannot run with the chosen backend (known before the weights load), else None."""
    if args.maps is not None and (args.backend != "torch" or args.int8):
        return (f"--maps needs --backend torch: the {args.backend}{' int8' if args.int8 else ''} export has no "
                f"localisation map output")
    return None


def run(args: argparse.Namespace) -> int:
    if world_size() == 1:
        return _run(args, None)
    # under accelerate launch / torchrun: each process scores its share, process 0 merges (sharding.py)
    shards = Shards(args.device)
    try:
        return _run(args, shards)
    finally:
        shards.close()


def _run(args: argparse.Namespace, shards: Shards | None) -> int:
    main = shards is None or shards.is_main
    device, threads = (args.device, args.threads) if shards is None else (shards.device(args.device), shards.threads(args.threads))
    try:
        options = stream_options(args)
        weights, why = find_weights(args.weights)
    except (ValueError, WeightsNotFound) as exc:
        log.error("dfd predict: %s", exc)
        return 2
    problem = maps_backend_problem(args)
    if problem:
        log.error("dfd predict: %s", problem)
        return 2
    if main:
        print(f"dfd predict: weights {why}" if args.weights is None else f"dfd predict: weights {weights}")
    try:
        predictor = Predictor.load(weights, device=device, batch_size=args.batch_size,
                                   threads=threads, preprocess=args.preprocess, backend=args.backend, int8=args.int8,
                                   export_dir=args.export_dir)
        verdicts = resolve_threshold(predictor.config, args.threshold)
        if args.maps is not None:
            predictor.require_maps()
    except (BackendUnavailable, CheckpointError, ValueError) as exc:
        log.error("dfd predict: %s", exc)
        return 2
    problems: list[str] = []
    out = Path(args.out)
    options = dataclasses.replace(options, verdicts=verdicts)
    try:
        if shards is None:
            summary = score_stream(predictor, args.paths, out, options, resume=args.resume, progress=True, problems=problems)
        else:
            summary = shards.score(predictor, args.paths, out, options, resume=args.resume, progress=True, problems=problems)
    except ValueError as exc:  # --resume onto a CSV of other columns
        if main:
            log.error("dfd predict: %s", exc)
        return 2
    if summary is None:  # not process 0: its rows are in the merged CSV, process 0 reports
        return 0
    for problem in problems:
        log.warning("dfd predict: %s", problem)
    for path, error in summary.failed:
        log.warning("dfd predict: skipped %s: %s", path, error)
    if not summary.files and not summary.skipped:
        log.error("dfd predict: nothing to score")
        return 1
    resumed = f", {summary.skipped} already in the CSV" if summary.skipped else ""
    failed = f" ({len(summary.failed)} unreadable)" if summary.failed else ""
    print(f"scored {summary.scored} of {summary.files} files -> {out}{failed}{resumed}")
    print(f"verdicts at threshold {verdicts.value:.4f} ({verdicts.note}): {summary.fake} fake")
    if args.maps is not None:
        print(f"localisation maps -> {args.maps} (photos only; the CSV's map column names each file)")
    notice = demo_notice(predictor.config)
    if notice:
        print(notice)
    return 0 if summary.scored or summary.skipped else 1
