"""``dfd predict PATH...``: score image files, folders (recursively) and globs into a CSV.

Unreadable files are listed with their reason on stderr and in the CSV's ``error`` column;
the exit code is non-zero only when nothing could be scored.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from dfd_lib.checkpoint import CheckpointError
from dfd_lib.images import is_image_path
from dfd_lib.inference import DEFAULT_WEIGHTS_DIR, PREPROCESS_MODES, Predictor


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given, image files under folders (recursively, sorted), glob matches.
    Returns ``(paths, problems)``; an input that names nothing is a problem, not an error."""
    paths: list[Path] = []
    problems: list[str] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p))
            if not found:
                problems.append(f"{text}: folder holds no image files")
            paths.extend(found)
        elif path.exists():
            paths.append(path)  # an explicitly named file is scored whatever its extension
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{text}: pattern matches no files")
            paths.extend(found)
        else:
            problems.append(f"{text}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return unique, problems


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
        print(f"dfd predict: {problem}", file=sys.stderr)
    if not paths:
        print("dfd predict: nothing to score", file=sys.stderr)
        return 1
    if not Path(args.weights).is_dir():
        print(f"dfd predict: weights folder {args.weights} not found; convert the released weights with "
              f"`dfd convert-weights SRC {DEFAULT_WEIGHTS_DIR}` or pass --weights DIR", file=sys.stderr)
        return 2
    try:
        predictor = Predictor.load(args.weights, device=args.device, batch_size=args.batch_size,
                                   threads=args.threads, preprocess=args.preprocess)
    except (CheckpointError, ValueError) as exc:
        print(f"dfd predict: {exc}", file=sys.stderr)
        return 2
    table = predictor.predict_paths(paths, progress=True)
    failed = table[table["error"] != ""]
    for row in failed.itertuples():
        print(f"dfd predict: skipped {row.path}: {row.error}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    scored = len(table) - len(failed)
    print(f"scored {scored} of {len(table)} images -> {out}" + (f" ({len(failed)} unreadable)" if len(failed) else ""))
    return 0 if scored else 1
