"""UMAP coordinates and every figure are produced and written to disk."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dfd_lib.embed.clusters import assign_groups_to_clusters, cluster_embeddings, silhouette_sweep
from dfd_lib.embed.plots import plot_by_family, plot_official_split, plot_resplits, plot_silhouette
from dfd_lib.embed.projection import fit_umap
from dfd_lib.embed.resplits import leave_one_cluster_out


@pytest.fixture(scope="module")
def mapped():
    rng = np.random.default_rng(0)
    n = 240
    blob = rng.integers(0, 3, n)
    emb = (rng.normal(size=(3, 64))[blob] * 8 + rng.normal(size=(n, 64))).astype(np.float32)
    table = pd.DataFrame({
        "path": [f"/d/{i}.png" for i in range(n)], "label": rng.integers(0, 2, n),
        "family": rng.choice(["real", "splice", "sd_img2img"], n), "group": [f"g{i}" for i in range(n)],
        "split": rng.choice(["train", "val"], n, p=[0.8, 0.2]),
    })
    table = leave_one_cluster_out(assign_groups_to_clusters(table, cluster_embeddings(emb, 3)))
    return emb, fit_umap(emb, n_neighbors=10, seed=0, n_epochs=50), table, blob


@pytest.mark.slow
def test_umap_keeps_blobs_apart(mapped):
    emb, coords, _, blob = mapped
    assert coords.shape == (len(emb), 2) and np.isfinite(coords).all()
    centres = np.stack([coords[blob == b].mean(0) for b in range(3)])
    spread = max(np.linalg.norm(coords[blob == b] - centres[b], axis=1).mean() for b in range(3))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread
    with pytest.raises(ValueError, match="2-D array"):
        fit_umap(emb[:2])


def test_figures_are_written(mapped, tmp_path):
    emb, coords, table, _ = mapped
    figures = {
        "official.png": lambda p: plot_official_split(coords, table, path=p),
        "family.png": lambda p: plot_by_family(coords, table, path=p),
        "resplits.png": lambda p: plot_resplits(coords, table, which=[0, 2], path=p),
        "silhouette.png": lambda p: plot_silhouette(silhouette_sweep(emb, [2, 3, 4], sample_size=None), path=p),
    }
    for name, draw in figures.items():
        path = tmp_path / "figs" / name
        fig = draw(path)
        assert isinstance(fig, plt.Figure)
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
        plt.close(fig)
    assert len(plot_resplits(coords, table).axes) == 3 * 2  # default: every re-split up to four
    with pytest.raises(ValueError, match="coordinates for"):
        plot_official_split(coords[:10], table)
