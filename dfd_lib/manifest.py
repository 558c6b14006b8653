"""One table describes a dataset: the manifest.

Columns (see ``data/manifest_format.md``): ``path`` (absolute in memory; written relative to
the manifest file when below it), ``label`` (0 real, 1 fake), ``family`` (fake family or
``real``), ``source`` (where the image comes from), ``group`` (id of the original image it
derives from: images of one group always land on the same side of a split), ``width``,
``height``, ``hash`` (sha1 of the file bytes), ``split`` and ``cluster``. Extra columns
(augmentation ``params``, ``seed``, ``parent``, re-split columns) travel along unchanged.

Readers build it from the competition layout (image folder + ``img_name,target`` CSV), from
``real/`` and ``fake/`` folders at any depth, or from a saved manifest. Every file is opened
and fully decoded once; an unreadable one is listed in ``skipped`` with its reason and never
stops the scan. Source files are only read.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from dfd_lib.atomic import atomic_write
from dfd_lib.images import ImageLoadError, is_image_path, load_rgb

COLUMNS = ["path", "label", "family", "source", "group", "width", "height", "hash", "split", "cluster"]
SKIPPED_COLUMNS = ["path", "reason"]
REAL, FAKE = 0, 1


class ManifestError(ValueError):
    """A dataset description that cannot be read (missing columns, bad labels, no images)."""


def file_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


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
            label=self.table["label"].map({REAL: "real", FAKE: "fake"}),
            split=self.table["split"].fillna("-"),
        )
        return table.groupby(["label", "family", "split"], dropna=False).size().unstack("split", fill_value=0)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (CSV) and, beside it, ``<stem>.skipped.csv``; paths below the
        manifest's folder are stored relative to it so the folder can move."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.table.copy()
        table["path"] = [_relative_to(p, path.parent) for p in table["path"]]
        _atomic_csv(table, path)
        _atomic_csv(self.skipped, skipped_path(path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path).resolve()
        if not path.is_file():
            raise ManifestError(f"manifest file not found: {path}")
        table = pd.read_csv(path, dtype={"group": str, "hash": str, "source": str, "family": str})
        if "path" not in table.columns:
            raise ManifestError(f"{path} has no 'path' column; columns: {list(table.columns)}")
        table["path"] = [str(_absolute(p, path.parent)) for p in table["path"]]
        skipped = pd.read_csv(skipped_path(path)) if skipped_path(path).is_file() else empty_skipped()
        return cls(table, skipped)


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


def inspect_image(path: str | os.PathLike) -> dict:
    """Decode one file fully: its size and content hash, or the reason it is unusable."""
    try:
        image = load_rgb(path)
    except ImageLoadError as exc:
        return {"path": str(path), "reason": exc.reason}
    except Exception as exc:  # noqa: BLE001 - a strange file must never stop a scan
        return {"path": str(path), "reason": f"unexpected {type(exc).__name__}: {exc}"}
    return {"path": str(path), "width": image.width, "height": image.height, "hash": file_sha1(path)}


def scan_images(rows: list[dict], workers: int = 4, progress: bool = True) -> Manifest:
    """Inspect every row's ``path`` (decoding in a thread pool) into a :class:`Manifest`.

    Each row holds at least ``path`` and ``label``; rows whose image cannot be used go to
    ``skipped`` with their reason. ``group`` defaults to the image's own content hash.
    """
    paths = [row["path"] for row in rows]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(inspect_image, paths), total=len(paths), desc="scan images", disable=not progress))
    good, skipped = [], []
    for row, result in zip(rows, results):
        if "reason" in result:
            skipped.append({"path": result["path"], "reason": result["reason"]})
            continue
        merged = {**row, **result}
        if not merged.get("group"):
            merged["group"] = result["hash"][:16]
        good.append(merged)
    table = pd.DataFrame(good) if good else empty_table()
    skipped_table = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS) if skipped else empty_skipped()
    for item in skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    return Manifest(table, skipped_table)


def read_competition(image_dir: str | os.PathLike, labels_csv: str | os.PathLike, split: str | None = None,
                     source: str = "competition", workers: int = 4, progress: bool = True) -> Manifest:
    """The competition layout: a folder of images and a CSV with ``img_name,target`` columns
    (``trainset_label.txt`` / ``valset_label.txt``); ``split`` names the set (train/val)."""
    image_dir, labels_csv = Path(image_dir), Path(labels_csv)
    if not image_dir.is_dir():
        raise ManifestError(f"image folder not found: {image_dir}")
    if not labels_csv.is_file():
        raise ManifestError(f"label file not found: {labels_csv}")
    labels = pd.read_csv(labels_csv, dtype={"img_name": str})
    if not {"img_name", "target"} <= set(labels.columns):
        header = pd.read_csv(labels_csv, header=None, nrows=1)
        if header.shape[1] == 2:
            labels = pd.read_csv(labels_csv, header=None, names=["img_name", "target"], dtype={"img_name": str})
        else:
            raise ManifestError(f"{labels_csv} needs columns img_name,target; found {list(labels.columns)}")
    labels["target"] = pd.to_numeric(labels["target"], errors="coerce")
    bad = ~labels["target"].isin([REAL, FAKE])
    rows, missing = [], []
    for name, target, is_bad in zip(labels["img_name"], labels["target"], bad):
        path = image_dir / name
        if is_bad:
            missing.append({"path": str(path), "reason": f"target is not 0 or 1 in {labels_csv.name}"})
            continue
        rows.append({"path": str(path), "label": int(target), "family": "real" if target == REAL else "fake",
                     "source": source, "split": split})
    manifest = scan_images(rows, workers=workers, progress=progress)
    if missing:
        manifest.skipped = pd.concat([manifest.skipped, pd.DataFrame(missing)], ignore_index=True)
    return manifest


def read_real_fake_folders(root: str | os.PathLike, workers: int = 4, progress: bool = True) -> Manifest:
    """Images below any folder named ``real`` or ``fake`` (case-insensitive, at any depth).

    ``family`` is the first folder below ``fake/`` (else ``fake``); ``source`` is the path of
    the folder holding ``real/``/``fake/`` relative to ``root`` (else the root's name).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"dataset folder not found: {root}")
    rows, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts = path.relative_to(root).parts
        marker = next((i for i in range(len(parts) - 2, -1, -1) if parts[i].lower() in ("real", "fake")), None)
        if marker is None:
            continue
        if not is_image_path(path):
            skipped.append({"path": str(path), "reason": f"not an image extension ({path.suffix or 'none'})"})
            continue
        label = FAKE if parts[marker].lower() == "fake" else REAL
        below = parts[marker + 1:-1]
        family = (below[0] if below else "fake") if label == FAKE else "real"
        source = "/".join(parts[:marker]) or root.name
        rows.append({"path": str(path), "label": label, "family": family, "source": source})
    if not rows and not skipped:
        raise ManifestError(f"no real/ or fake/ folders with images found below {root}")
    manifest = scan_images(rows, workers=workers, progress=progress)
    if skipped:
        for item in skipped:
            print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
        manifest.skipped = pd.concat([manifest.skipped, pd.DataFrame(skipped)], ignore_index=True)
    return manifest


def read_dataset(spec: str | os.PathLike, labels_csv: str | os.PathLike | None = None, **kwargs) -> Manifest:
    """Any supported dataset description: a saved manifest (``.csv``), a competition folder
    with ``labels_csv``, or a folder of ``real/``/``fake/`` trees."""
    spec = Path(spec)
    if labels_csv:
        return read_competition(spec, labels_csv, **kwargs)
    if spec.is_file():
        return Manifest.load(spec)
    if spec.is_dir():
        return read_real_fake_folders(spec, **kwargs)
    raise ManifestError(f"dataset not found: {spec} (give a manifest .csv, a real/fake folder, or an image folder with --labels)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="a real/ fake/ folder tree, a competition image folder (with --labels), or a manifest .csv")
    parser.add_argument("--labels", help="competition CSV with img_name,target columns")
    parser.add_argument("--split", help="split name for a competition set (train, val)")
    parser.add_argument("--out", required=True, help="manifest CSV to write")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")


def run(args: argparse.Namespace) -> int:
    extra = {"split": args.split} if args.labels else {}
    try:
        manifest = read_dataset(args.dataset, labels_csv=args.labels, workers=args.workers, **extra)
    except ManifestError as exc:
        print(f"dfd manifest: {exc}", file=sys.stderr)
        return 2
    out = manifest.save(args.out)
    print(manifest.summary().to_string())
    print(f"{len(manifest)} images -> {out}; {len(manifest.skipped)} skipped -> {skipped_path(out)}")
    return 0 if len(manifest) else 1
