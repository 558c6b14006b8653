"""Benchmark: the UMAP map in a new process, with and without numba's on-disk cache of umap-learn.

    python bench/bench_umap_startup.py [--rows 200 2000] [--rounds 3]

Every papermill kernel of notebook 01 (and every test that draws a map) is a new process, where
umap-learn compiles its numba functions again at their first call. :func:`dfd_lib.embed.projection.fit_umap`
keeps them in numba's cache (``cache_numba_functions``). Each round starts, per row count, one child
process the old way (that switch replaced by a no-op) and one the new way, in turn, and times the
whole child (interpreter start and imports included); the children's maps are compared. The first
new-way child of the first round fills the cache, so its time is printed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
import numpy as np
from dfd_lib.embed import projection
if sys.argv[1] == "old":
    projection.cache_numba_functions = lambda packages: 0
x = np.random.default_rng(0).normal(size=(int(sys.argv[2]), 64)).astype(np.float32)
started = time.perf_counter()
coords = projection.fit_umap(x, seed=0)
print(json.dumps({"fit_s": time.perf_counter() - started, "coords": coords[:5].tolist()}))
"""


def _child(way: str, rows: int) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, way, str(rows)], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - started, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    first = True
    for rows in args.rows:
        totals: dict[str, list[float]] = {"old": [], "new": []}
        fits: dict[str, list[float]] = {"old": [], "new": []}
        maps = {}
        for _ in range(args.rounds):
            for way in ("old", "new"):
                wall, out = _child(way, rows)
                if way == "new" and first:
                    print(f"  first new-way child (fills the cache when it is empty): {wall:.1f} s, fit {out['fit_s']:.1f} s")
                    first = False
                    wall, out = _child(way, rows)
                totals[way].append(wall)
                fits[way].append(out["fit_s"])
                maps.setdefault(way, out["coords"])
                assert out["coords"] == maps[way], f"{way}: the map changed between runs"
        same = maps["old"] == maps["new"]
        old, new = min(totals["old"]), min(totals["new"])
        print(f"{rows} rows: process old {old:.1f} s (fit {min(fits['old']):.1f} s), new {new:.1f} s "
              f"(fit {min(fits['new']):.1f} s): {old / new:.2f}x faster per process, {old - new:.1f} s saved; "
              f"same map: {same}   (best of {args.rounds}; every round old/new: "
              f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(totals['old'], totals['new']))})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
