"""Two jobs sharing the cores (the test suite's two workers, two pipelines on one machine): OpenMP threads per job.

Starts ``--jobs`` processes at once, each forwarding the same model (timm ``tf_efficientnet_b4``, random
weights, ``--batch`` images at ``--size`` px, ``--steps`` forward passes after one warm-up) with torch at
``T`` threads, for T = all the cores (torch's default: what each test worker had before conftest.py gave it its
share) and T = cores // jobs (the share, ``DFD_CPUS`` and ``OMP_NUM_THREADS``: dfd_lib/core/cpus.py), and
prints each job's forward time and the ratio, side by side in one run. One job alone at all the cores is the
reference for what the machine can do.

    python bench/bench_shared_cores.py [--jobs 2] [--steps 15] [--size 64] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

JOB = """
import sys, time, torch, timm
torch.manual_seed(0)
model = timm.create_model("tf_efficientnet_b4", pretrained=False).eval()
x = torch.randn({batch}, 3, {size}, {size})
with torch.inference_mode():
    model(x)
    started = time.perf_counter()
    for _ in range({steps}):
        model(x)
print(f"{{time.perf_counter() - started:.3f}}")
"""


def run_jobs(jobs: int, threads: int, args: argparse.Namespace) -> tuple[float, list[float]]:
    """``jobs`` processes started together at ``threads`` torch threads: (wall s, each job's forward s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DFD_CPUS": str(threads)}
    code = JOB.format(batch=args.batch, size=args.size, steps=args.steps)
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    times = [float(p.communicate()[0].strip()) for p in processes]
    return time.perf_counter() - started, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // args.jobs)
    print(f"{cores} cores, {args.jobs} jobs, tf_efficientnet_b4 x{args.steps} at {args.batch}x{args.size}px")
    _, alone = run_jobs(1, cores, args)
    print(f"  1 job alone, {cores} threads: forward {alone[0]:.2f} s")
    results = {}
    for threads in (cores, share):
        wall, times = run_jobs(args.jobs, threads, args)
        results[threads] = max(times)
        print(f"  {args.jobs} jobs at {threads} thread(s) each: forward " + ", ".join(f"{t:.2f}" for t in times)
              + f" s (slowest {max(times):.2f} s; wall {wall:.1f} s)")
    if share != cores:
        print(f"  ratio, all the cores each / the share each: {results[cores] / results[share]:.2f}x slower")


if __name__ == "__main__":
    main()
