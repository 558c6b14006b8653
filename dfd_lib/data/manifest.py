"""One table describes a dataset: the manifest, and the words every step uses for its rows.

Columns (see ``data/manifest_format.md``): ``path`` (absolute in memory; written relative to
the manifest file when below it), ``label`` (0 real, 1 fake), ``family`` (fake family or
``real``), ``source`` (where the image comes from), ``group`` (id of the original image it
derives from: images of one group always land on the same side of a split), ``width``,
``height``, ``hash`` (sha1 of the file bytes), ``split`` (``train`` / ``val`` / ``test``) and
``cluster``. The optional ``mask`` column names each image's manipulation mask (a single-channel image
of the image's size, nonzero where the image was manipulated; stored like ``path``, relative to the
manifest when below it; empty for reals and for fakes of unknown extent): the factory's fakes bring
one, and so may a user's own data; :meth:`Manifest.load` checks each is there and of its image's size.
Extra columns (augmentation ``params``, ``seed``, ``parent``, re-split columns) travel along
unchanged. :mod:`dfd_lib.data.readers` builds manifests from datasets on disk.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from dfd_lib.core.atomic import atomic_write

COLUMNS = ["path", "label", "family", "source", "group", "width", "height", "hash", "split", "cluster"]
SKIPPED_COLUMNS = ["path", "reason"]
MASK = "mask"  # optional column: the image's manipulation mask (a path, like ``path``), empty when none
PATH_COLUMNS = ("path", MASK)  # columns of file paths: stored relative to the manifest's folder when below it
REAL, FAKE = 0, 1  # the label column
CLASS_NAMES = {REAL: "real", FAKE: "fake"}
TRAIN, VAL, TEST = "train", "val", "test"  # the split column; train/val are also the two sides of a re-split
SPLITS = (TRAIN, VAL, TEST)


class ManifestError(ValueError):
    """A dataset description that cannot be read (missing columns, bad labels, no images)."""


def file_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(table: pd.DataFrame) -> str:
    """A sha256 of what a dataset is — each image's content hash, label, split and family — independent
    of where its files lie and of row order (what a run records of its input, so a rerun can tell
    whether it reads the same data)."""
    columns = [c for c in ("hash", "label", "split", "family") if c in table.columns] or ["path"]
    rows = sorted("\t".join(map(str, row)) for row in table[columns].astype(str).itertuples(index=False))
    return hashlib.sha256("\n".join(["\t".join(columns), *rows]).encode()).hexdigest()


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})


def empty_skipped() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in SKIPPED_COLUMNS})


@dataclass
class Manifest:
    """A dataset: the usable images in ``table``, the refused files with reasons in ``skipped``."""

    table: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=empty_skipped)

    def __post_init__(self) -> None:
        missing = [c for c in ("path", "label") if c not in self.table.columns]
        if missing:
            raise ManifestError(f"manifest lacks required column(s) {missing}; it has {list(self.table.columns)}")
        for column in COLUMNS:
            if column not in self.table.columns:
                self.table[column] = pd.NA
        bad = ~self.table["label"].isin([REAL, FAKE])
        if bad.any():
            raise ManifestError(
                f"labels must be 0 (real) or 1 (fake); found {sorted(map(str, self.table.loc[bad, 'label'].unique()))[:5]}"
            )
        self.table["label"] = self.table["label"].astype(int)
        ordered = COLUMNS + [c for c in self.table.columns if c not in COLUMNS]
        self.table = self.table[ordered].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.table)

    def summary(self) -> pd.DataFrame:
        """Image counts per label, family and split."""
        table = self.table.assign(
            label=self.table["label"].map(CLASS_NAMES),
            split=self.table["split"].fillna("-"),
        )
        return table.groupby(["label", "family", "split"], dropna=False).size().unstack("split", fill_value=0)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (CSV) and, beside it, ``<stem>.skipped.csv``; paths below the
        manifest's folder are stored relative to it so the folder can move."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.table.copy()
        for column in (c for c in PATH_COLUMNS if c in table.columns):
            table[column] = [p if _empty(p) else _relative_to(p, path.parent) for p in table[column]]
        _atomic_csv(table, path)
        _atomic_csv(self.skipped, skipped_path(path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, check_masks: bool = True) -> Manifest:
        """Read ``path``; with ``check_masks`` a ``mask`` that is missing, unreadable or of another size
        than its image is a :class:`ManifestError` naming the rows (only image headers are read)."""
        path = Path(path).resolve()
        if not path.is_file():
            raise ManifestError(f"manifest file not found: {path}")
        table = pd.read_csv(path, dtype={"group": str, "hash": str, "source": str, "family": str, MASK: str})
        if "path" not in table.columns:
            raise ManifestError(f"{path} has no 'path' column; columns: {list(table.columns)}")
        for column in (c for c in PATH_COLUMNS if c in table.columns):
            table[column] = [p if _empty(p) else str(_absolute(p, path.parent)) for p in table[column]]
        skipped = pd.read_csv(skipped_path(path)) if skipped_path(path).is_file() else empty_skipped()
        manifest = cls(table, skipped)
        problems = mask_problems(manifest.table) if check_masks else []
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ManifestError(f"{path}: {len(problems)} mask(s) cannot be used: " + "; ".join(problems[:5]) + more)
        return manifest

    def masked(self) -> pd.Series:
        """Which rows have a manipulation mask (all False without a ``mask`` column)."""
        if MASK not in self.table.columns:
            return pd.Series(False, index=self.table.index)
        return ~self.table[MASK].map(_empty).astype(bool)


def mask_problems(table: pd.DataFrame) -> list[str]:
    """One line per row whose ``mask`` cannot be used: missing, not an image, or not of its image's size
    (the ``width``/``height`` columns, else the image's own header)."""
    if MASK not in table.columns:
        return []
    problems = []
    for row in table[~table[MASK].map(_empty).astype(bool)].itertuples(index=False):
        row = row._asdict()
        mask, image = str(row[MASK]), str(row["path"])
        try:
            mask_size = _image_size(mask)
        except (OSError, ValueError) as exc:
            problems.append(f"mask {mask} of {image}: {'missing' if not Path(mask).exists() else f'not an image ({exc})'}")
            continue
        try:
            size = _recorded_size(row) or _image_size(image)
        except (OSError, ValueError):
            continue  # an unreadable image is the readers' to report, not the mask's
        if mask_size != size:
            problems.append(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {size[0]}x{size[1]}")
    return problems


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _recorded_size(row: dict) -> tuple[int, int] | None:
    width, height = row.get("width"), row.get("height")
    return None if _empty(width) or _empty(height) else (int(width), int(height))


def _empty(value) -> bool:
    """An empty cell: None, NaN / NA or ""."""
    if value is None or (isinstance(value, str) and value == ""):
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def skipped_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.stem + ".skipped.csv")


def _atomic_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def _relative_to(p: str, base: Path) -> str:
    try:
        return Path(p).resolve().relative_to(base).as_posix()
    except ValueError:
        return str(p)


def _absolute(p: str, base: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (base / q).resolve()
