"""Benchmark: embedding throughput and the cache -> UMAP -> k-means -> saved re-splits path.

    python bench/bench_features.py [--images 256] [--sizes 10000 50000 100000]

Part 1 embeds ``--images`` real photo crops (scikit-image's bundled photos) at the demo size
with the pretrained tf_efficientnet_lite0 through :func:`dfd_lib.embed.embeddings.extract_embeddings`
(DataLoader decoding, streaming to the cache), then reruns it to time a cache hit.
Part 2 writes synthetic embeddings of lite0's width (1280) to a cache file and times, per
size, everything notebooks 01 and 02 do after extraction: open the memmap, PCA + UMAP,
k-means, group assignment, leave-one-cluster-out, leakage check and saving the CSV.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dfd_lib.data.resplit_table import check_no_group_leakage, save_resplits
from dfd_lib.embed.clusters import assign_groups_to_clusters, cluster_embeddings
from dfd_lib.embed.embeddings import EmbeddingConfig, extract_embeddings
from dfd_lib.embed.projection import fit_umap
from dfd_lib.embed.resplits import leave_one_cluster_out


def _photo_crops(folder: Path, count: int, size: int, seed: int = 0) -> pd.DataFrame:
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        crop.save(path, quality=92)
        paths.append(str(path))
    return pd.DataFrame({"path": paths})


def bench_embedding(images: int, image_size: int, batch_size: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table = _photo_crops(Path(tmp), images, image_size)
        config = EmbeddingConfig("tf_efficientnet_lite0", image_size=image_size, batch_size=batch_size,
                                 num_workers=workers, device="cpu")
        kwargs = dict(cache_dir=Path(tmp) / "cache", progress=False)
        extract_embeddings(table.iloc[:batch_size], config, **kwargs)  # warm-up
        start = time.perf_counter()
        result = extract_embeddings(table, config, **kwargs)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        extract_embeddings(table, config, **kwargs)
        hit = time.perf_counter() - start
    print(f"embedding: lite0 (pretrained) {images} images at {image_size}px, batch {batch_size}, "
          f"{workers} workers, {torch.get_num_threads()} torch threads: {cold:.1f} s = {images / cold:.1f} img/s; "
          f"width {result.embeddings.shape[1]}; cache hit {hit:.2f} s", flush=True)


def _synthetic(n: int, width: int, seed: int) -> np.ndarray:
    """Embeddings with cluster structure: 30 domains in a 40-dim subspace plus noise, ReLU-like >= 0."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(40, width)).astype(np.float32) / np.sqrt(40)
    centres = rng.normal(size=(30, 40)).astype(np.float32) * 3
    domain = rng.integers(0, 30, n)
    latent = centres[domain] + rng.normal(size=(n, 40)).astype(np.float32)
    return np.maximum(latent @ basis + 0.3 * rng.normal(size=(n, width)).astype(np.float32), 0)


def bench_cluster_path(n: int, width: int, k: int, seed: int | None, n_epochs: int | None, init: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "emb.npy"
        np.save(cache, _synthetic(n, width, 0))
        table = pd.DataFrame({"path": [f"/data/{i}.png" for i in range(n)], "label": np.arange(n) % 2,
                              "group": [f"g{i // 3}" for i in range(n)], "hash": [f"h{i}" for i in range(n)]})
        times = {}
        start = time.perf_counter()
        emb = np.load(cache, mmap_mode="r")
        t = time.perf_counter()
        coords = fit_umap(emb, seed=seed, n_epochs=n_epochs, init=init)
        times["pca+umap"] = time.perf_counter() - t
        t = time.perf_counter()
        clusters = cluster_embeddings(emb, k, seed=0)
        times["kmeans"] = time.perf_counter() - t
        t = time.perf_counter()
        resplits = leave_one_cluster_out(assign_groups_to_clusters(table, clusters))
        check_no_group_leakage(resplits)
        save_resplits(resplits.assign(umap_x=coords[:, 0], umap_y=coords[:, 1]), Path(tmp) / "resplits.csv")
        times["resplits+save"] = time.perf_counter() - t
        total = time.perf_counter() - start
    parts = ", ".join(f"{name} {value:.1f} s" for name, value in times.items())
    print(f"cache->resplits: {n} x {width}, k={k}, umap seed={seed} n_epochs={n_epochs or 'auto'} init={init or 'auto'}: "
          f"total {total:.1f} s ({parts})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 50_000, 100_000])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None, help="UMAP seed (fixed = single-threaded)")
    parser.add_argument("--n-epochs", type=int, default=None)
    parser.add_argument("--init", default=None, help="UMAP initialisation: spectral or pca (default: fit_umap's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"cpu cores: {os.cpu_count()}, torch {torch.__version__}", flush=True)
    if args.images:
        bench_embedding(args.images, args.image_size, args.batch_size, args.workers)
    for n in args.sizes:
        bench_cluster_path(n, args.width, args.k, args.seed, args.n_epochs, args.init)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
