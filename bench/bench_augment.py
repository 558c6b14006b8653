"""Images per minute for each augmentation family (tiny random-weight SD pipeline on CPU).

Runs :func:`dfd_lib.synth.enrichment.enrich_dataset` end to end (source decode, edit or generation,
PNG write, hash, sidecar) one family at a time on 128 px crops of bundled photos, after one
warm-up call that pays the one-off imports and first-call costs. Each family runs
``--repeats`` times into fresh folders and the fastest run counts (the machine is shared and
noisy; the 1-minute load average is printed beside the figures). The time of each family
includes building its pipeline (about 0.1 s once diffusers is imported). Prints a Markdown
table for bench/RESULTS.md.

    .venv/bin/python bench/bench_augment.py --images 64 --sd-images 16 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from dfd_lib.data.manifest import file_sha1  # noqa: E402
from dfd_lib.sources.photos import write_photo_crops  # noqa: E402
from dfd_lib.synth import factory  # noqa: E402
from dfd_lib.synth.config import EnrichmentConfig  # noqa: E402
from dfd_lib.synth.enrichment import enrich_dataset  # noqa: E402


def make_sources(folder: Path, count: int, size: int) -> pd.DataFrame:
    """``count`` random square crops of scikit-image's bundled photos, as a manifest table."""
    rows = []
    for i, (path, source) in enumerate(write_photo_crops(folder, count, size)):
        rows.append(dict(path=str(path), label=0, family="real", source=source, group=f"g{i}",
                         width=size, height=size, hash=file_sha1(path), split="train", cluster=0))
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per edit/degradation family")
    parser.add_argument("--sd-images", type=int, default=16, help="images per Stable Diffusion (model-backed) family")
    parser.add_argument("--repeats", type=int, default=3, help="runs per family; the fastest counts")
    parser.add_argument("--size", type=int, default=128, help="side of the square source images (px)")
    parser.add_argument("--steps", type=int, default=4, help="SD denoising steps (before strength)")
    parser.add_argument("--strength", type=float, default=0.6, help="SD strength")
    parser.add_argument("--batch-size", type=int, default=8, help="SD images per call")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to compare")
    parser.add_argument("--families", nargs="+", default=list(factory.BUILTIN_FAMILIES), help="families to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        table = make_sources(tmp / "src", 32, args.size)
        common = dict(steps=args.steps, strength=args.strength, sd_batch_size=args.batch_size, device="cpu", source_splits=())
        # warm-up: imports and first-call costs of every code path
        enrich_dataset(table, EnrichmentConfig(families=tuple(args.families), images_per_family=2, **common),
                        tmp / "warmup", progress=False)
        results = []
        model_backed = {family.name for family in factory.model_families(args.families)}
        load_before = os.getloadavg()[0]
        for threads in args.threads:
            for family in args.families:
                n = args.sd_images if family in model_backed else args.images
                config = EnrichmentConfig(families=(family,), images_per_family=n, seed=1, torch_threads=threads, **common)
                times = []
                for repeat in range(args.repeats):
                    started = time.perf_counter()
                    rows, failures = enrich_dataset(table, config, tmp / f"out{threads}-{repeat}", progress=False)
                    times.append(time.perf_counter() - started)
                    assert len(rows) == n and failures.empty, failures
                results.append((threads, family, n, min(times), float(np.median(times))))
        load_after = os.getloadavg()[0]

    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.size} px, SD steps {args.steps} x strength {args.strength}, "
          f"batch {args.batch_size}, best of {args.repeats}; load average {load_before:.1f} -> {load_after:.1f}")
    print("| torch threads | family | images | best s | median s | images / minute (best) | ms / image (best) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for threads, family, n, best, median in results:
        print(f"| {threads} | {family} | {n} | {best:.2f} | {median:.2f} | {60 * n / best:,.0f} | {1000 * best / n:.1f} |")

if __name__ == "__main__":
    main()
