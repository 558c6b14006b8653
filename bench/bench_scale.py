"""How the data stages scale toward the competition's 672k images.

For each size (default 10k, 30k, 100k) it writes that many small JPEGs (crops of the packaged photos,
half of them under fake/ with a coloured block pasted in) and times, each stage in its own process so
its peak memory is its own: the manifest scan (decode every file, hash it), embedding (lite0 at a small
size: the cache write, then a cache hit), UMAP + k-means + the re-splits of notebook 02, and one pass of
the training data loader. It prints a table and each stage's time and memory extrapolated to 672k
images from the two largest sizes (a power law fitted through them).

    python bench/bench_scale.py [--sizes 10000 30000 100000] [--image-size 64] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPETITION = 672_000
STAGES = ("scan", "embed", "embed_cached", "map_and_resplits", "loader_pass")


def write_images(folder: Path, count: int, side: int) -> None:
    """``count`` JPEGs of ``side`` px: photo crops under real/, the same with a coloured block under fake/."""
    import numpy as np

    from dfd_lib.sources.photos import load_source, random_square_crop

    rng = np.random.default_rng(0)
    frames = [load_source(name) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    for i in range(count):
        crop, _ = random_square_crop(frames[i % 4], side, rng, scale=(0.3, 0.9))
        label = "fake" if i % 2 else "real"
        if label == "fake":
            x, y = (int(v) for v in rng.integers(0, side // 2, 2))
            crop.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (x, y, x + side // 3, y + side // 3))
        path = folder / label / f"{i // 1000:04d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, quality=90)


def run_stage(stage: str, folder: Path, work: Path, image_size: int) -> dict:
    """One stage in this process; its seconds (peak memory is read by the parent)."""
    import numpy as np
    import torch

    torch.set_num_threads(2)
    manifest_path = work / "manifest.csv"
    started = time.perf_counter()
    if stage == "scan":
        from dfd_lib.data.readers import read_real_fake_folders

        manifest = read_real_fake_folders(folder, workers=4, progress=False)
        manifest.table["split"] = np.where(np.arange(len(manifest)) % 5 == 0, "val", "train")
        manifest.save(manifest_path)
    elif stage in ("embed", "embed_cached"):
        from dfd_lib.data.manifest import Manifest
        from dfd_lib.embed.embeddings import EmbeddingConfig, extract_embeddings

        table = Manifest.load(manifest_path).table
        config = EmbeddingConfig(image_size=image_size, batch_size=128, num_workers=2, device="cpu")
        result = extract_embeddings(table, config, cache_dir=work / "embeddings", progress=False)
        np.save(work / "cache_path.npy", np.array([str(result.cache_path)]))
    elif stage == "map_and_resplits":
        from dfd_lib.data.manifest import Manifest
        from dfd_lib.data.resplit_table import save_resplits
        from dfd_lib.embed.embeddings import EmbeddingConfig, extract_embeddings
        from dfd_lib.embed.projection import fit_umap
        from dfd_lib.embed.resplits import build_resplits

        table = Manifest.load(manifest_path).table
        config = EmbeddingConfig(image_size=image_size, batch_size=128, num_workers=2, device="cpu")
        result = extract_embeddings(table, config, cache_dir=work / "embeddings", progress=False)  # a cache hit
        started = time.perf_counter()  # the map and the re-splits only
        fit_umap(result.embeddings, seed=None)
        save_resplits(build_resplits(result.table, result.embeddings, 7, seed=0, merge_single_class=False), work / "resplits.csv")
    elif stage == "loader_pass":
        from dfd_lib.data.datasets import ManifestDataset, make_loader
        from dfd_lib.data.manifest import Manifest

        dataset = ManifestDataset(Manifest.load(manifest_path).table, image_size, train=True)
        for _ in make_loader(dataset, 64, shuffle=True, num_workers=2, drop_last=True):
            pass
    return {"seconds": time.perf_counter() - started}


def _measure(stage: str, folder: Path, work: Path, image_size: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--stage", stage, "--folder", str(folder), "--work", str(work),
                           "--image-size", str(image_size)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def _extrapolate(sizes: list[int], values: list[float]) -> float:
    """A power law through the two largest sizes, evaluated at the competition's size."""
    (n1, v1), (n2, v2) = list(zip(sizes, values))[-2:]
    exponent = math.log(max(v2, 1e-9) / max(v1, 1e-9)) / math.log(n2 / n1)
    return v2 * (COMPETITION / n2) ** exponent, exponent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--image-size", type=int, default=64, help="side of the JPEGs and of the model inputs")
    parser.add_argument("--keep", type=Path, help="keep the images and work files here")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        row = run_stage(args.stage, args.folder, args.work, args.image_size)
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # decoding workers
        row["worker_peak_mib"] = children
        print(json.dumps(row))
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results: dict[str, dict[int, dict]] = {stage: {} for stage in STAGES}
    print(f"scale of the data stages, {args.image_size} px JPEGs, 2 torch threads, 2 loader workers", flush=True)
    print(f"{'images':>8s} {'stage':18s} {'seconds':>9s} {'img/s':>9s} {'peak MiB':>9s} {'workers MiB':>12s}", flush=True)
    try:
        for size in args.sizes:
            folder, work = root / f"images-{size}", root / f"work-{size}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            if not folder.exists():
                started = time.perf_counter()
                write_images(folder, size, args.image_size)
                print(f"{size:8d} {'(write JPEGs)':18s} {time.perf_counter() - started:9.1f}", flush=True)
            for stage in STAGES:
                row = _measure(stage, folder, work, args.image_size)
                results[stage][size] = row
                print(f"{size:8d} {stage:18s} {row['seconds']:9.1f} {size / row['seconds']:9.0f} {row['peak_mib']:9.0f} "
                      f"{row['worker_peak_mib']:12.0f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    sizes = list(args.sizes)
    print(f"\nextrapolated to {COMPETITION:,} images (power law through the two largest sizes)")
    print(f"{'stage':18s} {'time exponent':>14s} {'hours':>7s} {'memory exponent':>16s} {'peak GiB':>9s}")
    for stage in STAGES:
        seconds, time_exp = _extrapolate(sizes, [results[stage][n]["seconds"] for n in sizes])
        memory, mem_exp = _extrapolate(sizes, [results[stage][n]["peak_mib"] for n in sizes])
        print(f"{stage:18s} {time_exp:14.2f} {seconds / 3600:7.2f} {mem_exp:16.2f} {memory / 1024:9.1f}")


if __name__ == "__main__":
    main()
