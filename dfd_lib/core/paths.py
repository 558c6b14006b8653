"""Project locations, anchored to the package, never to the current directory."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = PROJECT_ROOT / "data"
WEIGHTS_DIR = PROJECT_ROOT / "weights"
REPORTS_DIR = PROJECT_ROOT / "reports"
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
PIPELINES_DIR = PROJECT_ROOT / "pipelines"
DEMO_DATA_DIR = DATA_DIR / "demo"


def cache_dir() -> Path:
    """Where derived, recomputable files (embeddings, converted weights) are cached."""
    return Path(os.environ.get("DFD_CACHE_DIR", PROJECT_ROOT / ".cache"))


def resolve(path: str | os.PathLike, base: Path = PROJECT_ROOT) -> Path:
    """An absolute path: relative paths are taken relative to ``base`` (the project root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)
