"""Which mixture to load when none is named: the one place ``dfd predict``, ``dfd serve``
(so ``make serve``) and notebook 05 decide it.

In order: ``weights/moe`` (where ``dfd convert-weights`` puts the released weights), then
the mixture of the most recent run under ``reports/`` (``reports/<run>/weights/moe``, the
newest by modification time: ``make demo`` writes ``reports/demo/weights/moe``). Nothing
there: :class:`WeightsNotFound` says how to get a mixture.
"""
from __future__ import annotations

import os
from pathlib import Path

from dfd_lib.core.paths import PROJECT_ROOT, REPORTS_DIR, WEIGHTS_DIR

DEFAULT_WEIGHTS_DIR = WEIGHTS_DIR / "moe"
MIXTURE_FILES = ("config.json", "weight.pth")  # ours, or the released checkpoint


class WeightsNotFound(FileNotFoundError):
    """No mixture where one was expected; the message says what to do."""


def is_mixture_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in MIXTURE_FILES)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def run_mixtures(reports_dir: Path | None = None) -> list[Path]:
    """Every ``<run>/weights/moe`` under ``reports_dir`` (default ``reports/``), newest first."""
    reports_dir = REPORTS_DIR if reports_dir is None else Path(reports_dir)
    if not reports_dir.is_dir():
        return []
    found = [run / "weights" / "moe" for run in reports_dir.iterdir() if is_mixture_dir(run / "weights" / "moe")]
    return sorted(found, key=lambda p: max(f.stat().st_mtime for f in p.iterdir()), reverse=True)


def find_weights(weights: str | os.PathLike | None = None, weights_dir: Path | None = None,
                 reports_dir: Path | None = None, prefer: Path | None = None) -> tuple[Path, str]:
    """``(folder, why)``: ``weights`` when given, else ``prefer`` when it holds a mixture (notebook
    05: its own run's), else ``weights_dir`` (``weights/moe``), else the newest run's mixture
    under ``reports_dir`` (``reports/``). Raises :class:`WeightsNotFound` with the way out."""
    weights_dir = DEFAULT_WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    reports_dir = REPORTS_DIR if reports_dir is None else Path(reports_dir)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_dir():
            raise WeightsNotFound(f"weights folder {path} not found; pass --weights DIR with a mixture "
                                  f"(config.json + model.safetensors, or the released weight.pth + ema.state), "
                                  f"or convert the released weights with `dfd convert-weights SRC {path}`")
        return path, "as given"
    if prefer is not None and is_mixture_dir(Path(prefer)):
        return Path(prefer), f"{_shown(Path(prefer))} (this run's)"
    if is_mixture_dir(weights_dir):
        return weights_dir, f"{_shown(weights_dir)} (the default)"
    runs = run_mixtures(reports_dir)
    if runs:
        return runs[0], f"{_shown(runs[0])} (the most recent run under {_shown(reports_dir)}/)"
    raise WeightsNotFound(
        f"no trained mixture found: neither {_shown(weights_dir)} nor any {_shown(reports_dir)}/<run>/weights/moe. "
        f"Run `make demo` (trains the demo mixture on this CPU, offline), or convert the released weights with "
        f"`dfd convert-weights SRC {_shown(weights_dir)}`, or pass --weights DIR")
