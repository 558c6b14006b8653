"""What the training tests share: a tiny labelled image folder with a learnable signal, and one torch
thread (float sums in one order, and no OpenMP oversubscription on the shared test machine)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image


def write_signal_images(folder: Path, count: int = 24, clusters: int = 0) -> pd.DataFrame:
    """``count`` noisy 40x48 PNGs in ``folder``, real and fake in turn; fakes carry a learnable signal
    (a saturated red channel). Rows: path, label, group (one per image) and, with ``clusters`` > 0,
    a ``cluster`` column cycling through that many."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        label = i % 2
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        if label:
            arr[..., 0] = 230
        path = folder / f"{'fake' if label else 'real'}_{i}.png"
        Image.fromarray(arr).save(path)
        row = {"path": str(path), "label": label, "group": str(i)}
        if clusters:
            row["cluster"] = i % clusters
        rows.append(row)
    return pd.DataFrame(rows)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block, its thread count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
