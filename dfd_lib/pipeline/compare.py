"""``dfd compare RUN_A RUN_B``: do two runs agree?

File by file, the artefacts that carry a run's results — manifests, re-splits, the augmented
manifest and images, tables, the 2-D map, embeddings, the mixture's weights — are compared by
content hash; where the hashes differ, CSV tables, JSON records, arrays and weights are compared
numerically (the largest difference against ``tolerance``) and text is compared after the two run
folders' own paths are replaced by ``<run>``. Then ``metrics.json`` metric by metric. Measured
durations and clock readings (keys and columns with a word ``seconds``, ``per_s``, ``time``,
``date``, ``timestamp``) differ between any two runs: they are counted, never compared. Figures,
executed notebooks and the report are left out (they hold the same numbers, drawn or printed,
plus timings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from dfd_lib.core import runs
from dfd_lib.core.paths import PROJECT_ROOT, resolve

log = logging.getLogger(__name__)
COMPARED = ("*.csv", f"{runs.TABLES_DIR}/**/*", f"{runs.AUGMENTED_DIR}/**/*", runs.UMAP_COORDS,
            f"{runs.EMBEDDINGS_DIR}/**/*", f"{runs.MOE_WEIGHTS}/**/*")
# names of measured durations and clock readings: a word of a key or column (delimited by _ . space or /)
TIMING = re.compile(r"(^|[_.\s/])(seconds|per_s|time|date|timestamp)($|[_.\s/])", re.IGNORECASE)
TEXT_SUFFIXES = (".txt", ".yaml")
IDENTICAL, CLOSE, DIFFERS, ONLY_A, ONLY_B = "identical", "equal within tolerance", "differs", "only in A", "only in B"


@dataclass
class FileComparison:
    path: str
    status: str
    detail: str = ""
    difference: float = 0.0  # the largest numeric difference, inf when not comparable

    @property
    def notable(self) -> bool:
        """Worth listing: not identical, unless equal once the run folders' own paths are set aside."""
        return self.status != IDENTICAL and not (self.status == CLOSE and self.difference == 0)


@dataclass
class MetricComparison:
    key: str
    a: object
    b: object
    difference: float  # |a - b| for numbers; 0 or inf for other values

    def within(self, tolerance: float) -> bool:
        return self.difference <= tolerance


@dataclass
class RunComparison:
    run_a: Path
    run_b: Path
    tolerance: float
    files: list[FileComparison] = field(default_factory=list)
    metrics: list[MetricComparison] = field(default_factory=list)
    timings_skipped: int = 0

    @property
    def agree(self) -> bool:
        return (all(f.status in (IDENTICAL, CLOSE) for f in self.files)
                and all(m.within(self.tolerance) for m in self.metrics))

    def to_text(self, show: int = 30) -> str:
        counts = pd.Series([f.status for f in self.files], dtype=object).value_counts().to_dict()
        lines = [f"A: {self.run_a}", f"B: {self.run_b}",
                 "files: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in (IDENTICAL, CLOSE, DIFFERS, ONLY_A, ONLY_B))]
        lines += [f"  {f.status:22s} {f.path}" + (f": {f.detail}" if f.detail else "")
                  for f in self.files if f.notable][:show]
        off = [m for m in self.metrics if not m.within(self.tolerance)]
        lines.append(f"metrics: {len(self.metrics)} compared, {len(self.metrics) - len(off)} within {self.tolerance:g}, "
                     f"largest difference {max((m.difference for m in self.metrics), default=0.0):.3g}; "
                     f"{self.timings_skipped} timings not compared")
        lines += [f"  {m.key}: {m.a!r} vs {m.b!r} (|diff| {m.difference:.3g})" for m in off[:show]]
        lines.append("the runs agree" if self.agree else "the runs DIFFER")
        return "\n".join(lines)


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, tolerance: float = 1e-6) -> RunComparison:
    a, b = resolve(run_a).resolve(), resolve(run_b).resolve()
    for root in (a, b):
        if not (root / runs.PARAMS).is_file():
            raise FileNotFoundError(f"{root} is not a run folder (no {runs.PARAMS})")
    result = RunComparison(a, b, tolerance)
    files_a, files_b = _artefacts(a), _artefacts(b)
    for name in sorted(files_a | files_b):
        if name not in files_b or name not in files_a:
            result.files.append(FileComparison(name, ONLY_A if name in files_a else ONLY_B))
        else:
            result.files.append(_compare_file(a, b, name, tolerance))
    result.metrics, result.timings_skipped = _compare_metrics(runs.RunDir(a).metrics(), runs.RunDir(b).metrics())
    return result


def _artefacts(root: Path) -> set[str]:
    found = set()
    for pattern in COMPARED:
        found.update(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file())
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _compare_file(a: Path, b: Path, name: str, tolerance: float) -> FileComparison:
    path_a, path_b = a / name, b / name
    if _sha256(path_a) == _sha256(path_b):
        return FileComparison(name, IDENTICAL)
    try:
        if name.endswith(".csv"):
            difference, detail = _csv_difference(path_a, path_b, a, b)
        elif name.endswith(".npy"):
            difference, detail = _array_difference(np.load(path_a), np.load(path_b))
        elif name.endswith(".safetensors"):
            difference, detail = _weights_difference(path_a, path_b)
        elif name.endswith(".json"):
            difference, detail = _json_difference(path_a, path_b, a, b, tolerance)
        elif name.endswith(TEXT_SUFFIXES):
            same = _normalised_file_text(path_a, a) == _normalised_file_text(path_b, b)
            difference, detail = (0.0, "equal after removing the run folders' paths") if same else (math.inf, "text differs")
        else:
            return FileComparison(name, DIFFERS, "content differs")
    except (ValueError, OSError, KeyError) as exc:
        return FileComparison(name, DIFFERS, f"could not compare: {exc}")
    status = CLOSE if difference <= tolerance else DIFFERS
    return FileComparison(name, status, detail, difference)


def _is_timing(name: str) -> bool:
    return bool(TIMING.search(str(name)))


def _json_difference(path_a: Path, path_b: Path, a: Path, b: Path, tolerance: float) -> tuple[float, str]:
    """Value by value, the run folders' paths set aside and clock readings left out (as for metrics)."""
    values_a = json.loads(_normalised_file_text(path_a, a))
    values_b = json.loads(_normalised_file_text(path_b, b))
    compared, skipped = _compare_metrics(values_a if isinstance(values_a, dict) else {"": values_a},
                                         values_b if isinstance(values_b, dict) else {"": values_b})
    worst = max(compared, key=lambda m: m.difference, default=None)
    if worst is None or worst.difference == 0:
        return 0.0, "equal after removing the run folders' paths" + (f" and {skipped} clock reading(s)" if skipped else "")
    return worst.difference, f"largest difference {worst.difference:.3g} at {worst.key!r} ({worst.a!r} vs {worst.b!r})"


def _normalised_text(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Text cells with the run folder's own path (and the project root) replaced, so two runs compare equal."""
    text = frame.select_dtypes(exclude="number").astype(str)
    for prefix, token in ((str(root), "<run>"), (str(PROJECT_ROOT), "<root>")):
        text = text.apply(lambda column, p=prefix, t=token: column.str.replace(p, t, regex=False))
    return text


def _normalised_file_text(path: Path, root: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace(str(root), "<run>").replace(str(PROJECT_ROOT), "<root>")


def _csv_difference(path_a: Path, path_b: Path, a: Path, b: Path) -> tuple[float, str]:
    frame_a, frame_b = pd.read_csv(path_a), pd.read_csv(path_b)
    if list(frame_a.columns) != list(frame_b.columns) or len(frame_a) != len(frame_b):
        return math.inf, f"shape {frame_a.shape} vs {frame_b.shape} or columns differ"
    keep = [c for c in frame_a.columns if not _is_timing(c)]
    frame_a, frame_b = frame_a[keep], frame_b[keep]
    text_a, text_b = _normalised_text(frame_a, a), _normalised_text(frame_b, b)
    if list(text_a.columns) != list(text_b.columns):
        return math.inf, "column types differ"
    unequal = [c for c in text_a.columns if not text_a[c].equals(text_b[c])]
    if unequal:
        return math.inf, f"text differs in column(s) {unequal[:5]}"
    numbers = frame_a.select_dtypes("number").columns
    if not len(numbers):
        return 0.0, "equal after removing the run folders' paths"
    gaps = {c: _max_gap(frame_a[c].to_numpy(float), frame_b[c].to_numpy(float)) for c in numbers}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], f"largest difference {gaps[worst]:.3g} in column {worst!r}"


def _max_gap(x: np.ndarray, y: np.ndarray) -> float:
    """The largest |x - y|: NaN against NaN and equal infinities count as equal (their difference would be
    NaN), NaN against a number or an infinity against anything else as infinitely far."""
    if x.shape != y.shape:
        return math.inf
    if not np.array_equal(np.isnan(x), np.isnan(y)):
        return math.inf
    differ = ~np.isnan(x) & (x != y)
    return float(np.max(np.abs(x[differ] - y[differ]), initial=0.0))


def _array_difference(x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    if x.shape != y.shape:
        return math.inf, f"shape {x.shape} vs {y.shape}"
    gap = _max_gap(x.astype(np.float64).ravel(), y.astype(np.float64).ravel())
    return gap, f"largest difference {gap:.3g}"


def _weights_difference(path_a: Path, path_b: Path) -> tuple[float, str]:
    tensors_a, tensors_b = load_file(str(path_a)), load_file(str(path_b))
    if set(tensors_a) != set(tensors_b):
        return math.inf, "different tensors"
    gaps = {name: _array_difference(tensors_a[name], tensors_b[name])[0] for name in tensors_a}
    worst = max(gaps, key=gaps.get, default="")
    return gaps.get(worst, 0.0), f"largest difference {gaps.get(worst, 0.0):.3g} in {worst}"


def flatten(values, prefix: str = "") -> dict[str, object]:
    """``{"04": {"auc": {"a": 1}}}`` -> ``{"04.auc.a": 1}``; lists by index."""
    if isinstance(values, dict):
        items = values.items()
    elif isinstance(values, list):
        items = enumerate(values)
    else:
        return {prefix: values}
    flat: dict[str, object] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _compare_metrics(metrics_a: dict, metrics_b: dict) -> tuple[list[MetricComparison], int]:
    flat_a, flat_b = flatten(metrics_a), flatten(metrics_b)
    compared, skipped = [], 0
    for key in sorted(set(flat_a) | set(flat_b)):
        if _is_timing(key):
            skipped += 1
            continue
        value_a, value_b = flat_a.get(key, "<absent>"), flat_b.get(key, "<absent>")
        compared.append(MetricComparison(key, value_a, value_b, _value_gap(value_a, value_b)))
    return compared, skipped


def _value_gap(a, b) -> float:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isnan(a) or math.isnan(b):
            return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
        return 0.0 if a == b else abs(float(a) - float(b))  # equal infinities too: inf - inf is NaN
    return 0.0 if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) else math.inf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", help="a run folder (reports/<run>) or a run name")
    parser.add_argument("run_b", help="the run folder to compare it with")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest difference taken as equal (default 1e-6)")
    parser.add_argument("--show", type=int, default=30, help="differences listed at most, per kind")


def run(args: argparse.Namespace) -> int:
    try:
        comparison = compare_runs(_run_path(args.run_a), _run_path(args.run_b), args.tolerance)
    except FileNotFoundError as exc:
        log.error("dfd compare: %s", exc)
        return 2
    print(comparison.to_text(args.show))
    return 0 if comparison.agree else 1


def _run_path(name: str) -> Path:
    """A run folder given as a path, or as a name under reports/."""
    path = Path(name)
    return path if path.exists() or os.sep in name else runs.REPORTS_DIR / name
