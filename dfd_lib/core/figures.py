"""Saving figures: every figure is shown in its notebook and saved under the run folder."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))  # headless by default; Jupyter sets its own


def save_figure(fig, path: str | os.PathLike | None, dpi: int = 120) -> Path | None:
    """Save ``fig`` as PNG at ``path`` (folders created) and return the path; ``None`` saves nothing."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
