"""Several verdicts drawn from one test split: Holm's correction keeps the chance of any false
"better" or "worse" among them at the level one verdict alone would have.

Holm (1979), step-down: sort the m p-values, multiply the k-th smallest by (m - k + 1), and keep each
adjusted value at least as large as the one before it (capped at 1). A verdict stands when its adjusted
p-value is below the family-wise level. Uniformly more powerful than Bonferroni, with no assumption on
how the comparisons depend on each other (the ladder's rungs share a test split and often a training).
"""
from __future__ import annotations

import numpy as np


def holm_adjusted(p_values) -> np.ndarray:
    """Holm's adjusted p-values, in the order given; NaN (a comparison not made) stays NaN and is not
    counted among the comparisons."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    adjusted = np.full_like(p, np.nan)
    made = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for rank, index in enumerate(made[np.argsort(p[made], kind="stable")]):
        running = max(running, min(1.0, (made.size - rank) * p[index]))
        adjusted[index] = running
    return adjusted
