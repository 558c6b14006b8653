"""Datasets on disk into manifests: the competition layout (image folder + ``img_name,target``
CSV), ``real/`` and ``fake/`` folders at any depth, or a saved manifest; also ``dfd manifest``.

Every file is opened and fully decoded once; an unreadable one is listed in ``skipped`` with its
reason and never stops the scan. Source files are only read.
"""
from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from dfd_lib.core.logs import progress_bar
from dfd_lib.data.images import ImageLoadError, is_image_path, load_rgb
from dfd_lib.data.manifest import (
    FAKE,
    REAL,
    SKIPPED_COLUMNS,
    Manifest,
    ManifestError,
    empty_skipped,
    empty_table,
    file_sha1,
    skipped_path,
)

log = logging.getLogger(__name__)


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
        results = list(progress_bar(pool.map(inspect_image, paths), total=len(paths), desc="scan images", disable=not progress))
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
        log.warning("skipped %s: %s", item["path"], item["reason"])
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
            log.warning("skipped %s: %s", item["path"], item["reason"])
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
        log.error("dfd manifest: %s", exc)
        return 2
    out = manifest.save(args.out)
    print(manifest.summary().to_string())
    print(f"{len(manifest)} images -> {out}; {len(manifest.skipped)} skipped -> {skipped_path(out)}")
    return 0 if len(manifest) else 1
