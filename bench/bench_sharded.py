"""Sharded embedding and scoring (issue 25, item 4): the same work in 1 and in N processes, side by side.

For each size (default 10k, 30k) it writes that many small JPEGs (bench_scale.py's crops of the
packaged photos) and times, each in its own process or under ``accelerate launch --multi_gpu
--num_processes N`` (N CPU processes over gloo):

- embedding: notebook 01's :func:`extract_embeddings` (lite0 at ``--image-size`` px) into a fresh
  cache, with ``shards`` under several processes (each its batches, process 0 merges);
- scoring: ``dfd predict``'s engine (:class:`Predictor` + :func:`score_stream`, or
  :class:`Shards`.score under several processes: parts, then process 0's merge) with a mixture of 2
  random-weight ``test_efficientnet`` experts at ``--image-size`` px, no decoding workers.

``work s`` is the time from a barrier after start-up (imports and the scoring model loaded) to the
finished (merged) output, in process 0 (the embedding's lite0 is built inside, from a warm import);
``wall s`` is the whole command, start-up of the processes (and of accelerate's launcher) included.
The CPU is split between the processes (cores // N torch threads each; decoding workers 2 // N,
at least 1), so on a CPU N processes can only tie with one; the figures show what sharding costs
(launch, barriers, merge), not what N GPUs gain. It ends with the extrapolation to 672k images on
8 GPUs: bench/gpu_check.py has no GPU figures recorded yet, so it extrapolates from this CPU.

    python bench/bench_sharded.py [--sizes 10000 30000] [--processes 2] [--image-size 64] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import write_images

COMPETITION = 672_000
GPUS = 8
STAGES = ("embed", "score")


def run_stage(stage: str, work: Path, folder: Path, image_size: int, threads: int) -> None:
    """One stage in this process (one of several under accelerate launch); process 0 prints its row."""
    import torch

    from dfd_lib.core.shards import world_size
    from dfd_lib.data.manifest import Manifest
    from dfd_lib.embed.embeddings import EmbeddingConfig, extract_embeddings
    from dfd_lib.models.backbones import create_backbone
    from dfd_lib.scoring.predictor import Predictor
    from dfd_lib.scoring.sharding import Shards
    from dfd_lib.scoring.stream import StreamOptions, score_stream

    shards = Shards("cpu") if world_size() > 1 else None
    processes = 1 if shards is None else shards.processes
    torch.set_num_threads(threads)
    out = work / f"{stage}-{processes}"
    # outside the timing, as in every process: the model's loading (and the imports it defers)
    predictor = Predictor.load(work / "moe", device="cpu", batch_size=64, threads=torch.get_num_threads())
    create_backbone(EmbeddingConfig().backbone, pretrained=True, num_classes=0)
    if shards is not None:
        shards.barrier()
    started = time.perf_counter()
    if stage == "embed":
        table = Manifest.load(work / "manifest.csv").table
        config = EmbeddingConfig(image_size=image_size, batch_size=128, num_workers=max(1, 2 // processes), device="cpu")
        extract_embeddings(table, config, cache_dir=out, progress=False, shards=shards)
    else:
        options = StreamOptions(workers=0)
        if shards is None:
            score_stream(predictor, [str(folder)], out.with_suffix(".csv"), options, progress=False)
        else:
            shards.score(predictor, [str(folder)], out.with_suffix(".csv"), options, progress=False)
    seconds = time.perf_counter() - started
    if shards is None or shards.is_main:
        print(json.dumps({"seconds": seconds}))
    if shards is not None:
        shards.close()


def prepare(work: Path, folder: Path, image_size: int) -> None:
    """The manifest of ``folder`` and a random-weight mixture of two tiny experts, once per size."""
    from dfd_lib.data.readers import read_real_fake_folders
    from dfd_lib.models.checkpoints import MixtureConfig, save_mixture
    from dfd_lib.models.experts import build_mixture

    read_real_fake_folders(folder, workers=2, progress=False).save(work / "manifest.csv")
    backbones = ["test_efficientnet", "test_efficientnet"]
    save_mixture(build_mixture(backbones), work / "moe", MixtureConfig(backbones=backbones, image_size=image_size))


def measure(stage: str, processes: int, work: Path, folder: Path, image_size: int, threads: int) -> dict:
    launch = (["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1 else [])
    command = [sys.executable, *launch, __file__, "--stage", stage, "--work", str(work), "--folder", str(folder),
               "--image-size", str(image_size), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{stage} on {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000])
    parser.add_argument("--processes", type=int, default=2, help="the sharded run's processes (compared with 1)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the JPEGs and of the model inputs")
    parser.add_argument("--keep", type=Path, help="keep the images and work files here")
    parser.add_argument("--one-threads", type=int, default=None,
                        help="torch threads of the one-process run (default: every core; the N processes: cores // N each)")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args.stage, args.work, args.folder, args.image_size, args.threads)
        return
    n, cores = args.processes, os.cpu_count() or 1
    threads = {1: args.one_threads or cores, n: max(1, cores // n)}
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_sharded_"))
    rates: dict[str, float] = {}
    print(f"sharded embedding and scoring, {args.image_size} px JPEGs, {cores} cores; torch threads: "
          f"{threads[1]} in the one process, {threads[n]} in each of {n}")
    print(f"{'images':>8s} {'stage':6s} {'1 proc work s':>14s} {f'{n} procs work s':>15s} {'ratio':>6s} "
          f"{'1 proc wall s':>14s} {f'{n} procs wall s':>15s} {'ratio':>6s} {'1 proc img/s':>13s}", flush=True)
    try:
        for size in args.sizes:
            folder, work = root / f"images-{size}", root / f"work-{size}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            if not folder.exists():
                write_images(folder, size, args.image_size)
            prepare(work, folder, args.image_size)
            for stage in STAGES:
                one, many = (measure(stage, p, work, folder, args.image_size, threads[p]) for p in (1, n))
                rates[stage] = size / one["seconds"]
                print(f"{size:8d} {stage:6s} {one['seconds']:14.1f} {many['seconds']:15.1f} "
                      f"{many['seconds'] / one['seconds']:6.2f} {one['wall']:14.1f} {many['wall']:15.1f} "
                      f"{many['wall'] / one['wall']:6.2f} {rates[stage]:13.0f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{COMPETITION:,} images on {GPUS} GPUs: bench/gpu_check.py has no GPU figures yet; from this CPU's "
          f"one-process rate at {args.sizes[-1]:,} images, times {GPUS} processes, linear in the images:")
    for stage in STAGES:
        hours = COMPETITION / rates[stage] / 3600
        print(f"  {stage:6s} 1 CPU process: {hours:6.2f} h;  {GPUS} processes at that rate each: {hours / GPUS:6.2f} h")


if __name__ == "__main__":
    main()
