"""Inputs from the command line and from folders: files, folders (searched recursively, lazily) and
globs, and the labels a ``real/`` / ``fake/`` folder tree gives its images."""
from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from dfd_lib.data.images import is_image_path
from dfd_lib.data.manifest import CLASS_NAMES
from dfd_lib.scoring.videos import is_video_path

LABEL_FOLDERS = {name: label for label, name in CLASS_NAMES.items()}  # "real" -> 0, "fake" -> 1


def is_scorable_path(path: str | os.PathLike) -> bool:
    """An image or a video by its extension (what ``dfd predict`` picks from folders)."""
    return is_image_path(path) or is_video_path(path)


def _walk(folder: Path, accept: Callable[[str], bool]) -> Iterator[Path]:
    """Accepted files under ``folder`` in sorted path order, one directory listing at a time."""
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir():
            yield from _walk(Path(entry.path), accept)
        elif entry.is_file() and accept(entry.name):
            yield Path(entry.path)


def iter_input_files(inputs: list[str], problems: list[str] | None = None,
                     accept: Callable[[str], bool] = is_scorable_path, what: str = "image or video") -> Iterator[Path]:
    """Files as given, accepted files under folders (recursively), glob matches: lazily, as
    absolute paths. An input that names nothing is appended to ``problems``, not raised."""
    seen: set[Path] | None = set() if len(inputs) > 1 else None  # duplicates only across inputs
    for text in inputs:
        path = Path(text).expanduser().absolute()  # rows name files the same way from any folder
        if path.is_dir():
            found = _walk(path, accept)
        elif path.exists():
            found = iter([path])  # an explicitly named file is scored whatever its extension
        elif glob.has_magic(text):
            found = (Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file())
        else:
            found = iter(())
            if problems is not None:
                problems.append(f"{text}: no such file or folder")
        count = 0
        for file in found:
            count += 1
            if seen is not None:
                key = file.resolve()
                if key in seen:
                    continue
                seen.add(key)
            yield file
        if not count and problems is not None and (path.is_dir() or glob.has_magic(text)):
            problems.append(f"{text}: folder holds no {what} files" if path.is_dir() else f"{text}: pattern matches no files")


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image files as given, under folders (recursively, sorted) and matching globs, resolved
    and without duplicates. Returns ``(paths, problems)``; an input that names nothing is a
    problem, not an error."""
    problems: list[str] = []
    paths = iter_input_files(inputs, problems, accept=is_image_path, what="image")
    return list(dict.fromkeys(p.resolve() for p in paths)), problems


def label_from_path(path: str | os.PathLike) -> float:
    """0 or 1 when a folder on the path is named ``real`` or ``fake`` (the innermost wins), else NaN."""
    for part in reversed(Path(path).parts[:-1]):
        if part.lower() in LABEL_FOLDERS:
            return float(LABEL_FOLDERS[part.lower()])
    return math.nan
