"""Inputs from the command line and from folders: files, folders (searched recursively) and globs,
and the labels a ``real/`` / ``fake/`` folder tree gives its images."""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

from dfd_lib.data.images import is_image_path
from dfd_lib.data.manifest import CLASS_NAMES

LABEL_FOLDERS = {name: label for label, name in CLASS_NAMES.items()}  # "real" -> 0, "fake" -> 1


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


def label_from_path(path: str | os.PathLike) -> float:
    """0 or 1 when a folder on the path is named ``real`` or ``fake`` (the innermost wins), else NaN."""
    for part in reversed(Path(path).parts[:-1]):
        if part.lower() in LABEL_FOLDERS:
            return float(LABEL_FOLDERS[part.lower()])
    return math.nan
