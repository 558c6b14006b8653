"""The bootstrap's cost: notebook 04 draws 1,000 stratified resamples for every test-split figure
(each headline model, each family x model, the ladder, the robustness levels). Side by side on the
same resamples: the obvious loop (resample the arrays, call binary_metrics, i.e. scikit-learn, once
per resample) and dfd-kit's vectorised curve_metrics (all resamples as one matrix of counts); the
intervals must agree.

    python bench/bench_bootstrap.py                  # 400 and 4,000 test images, 1,000 resamples
    python bench/bench_bootstrap.py --sizes 400 --resamples 200
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from dfd_lib.stats.bootstrap import INTERVAL_METRICS, curve_metrics, resample_counts  # noqa: E402
from dfd_lib.stats.metrics import binary_metrics  # noqa: E402


def loop_metrics(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    rows = [binary_metrics(labels[np.repeat(np.arange(labels.size), c.astype(int))],
                           scores[np.repeat(np.arange(labels.size), c.astype(int))]) for c in counts]
    return {m: np.array([r[m] for r in rows]) for m in INTERVAL_METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[400, 4000])
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'images':>7} {'resamples':>9} {'loop s':>8} {'vectorised s':>12} {'ratio':>7} {'max |diff| of 95% bounds':>25}")
    for n in args.sizes:
        labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
        scores = np.round(rng.normal(labels * 0.8, 1.0), 3)  # ties, as a model's scores have
        counts = resample_counts(labels, args.resamples, seed=0)
        started = time.perf_counter()
        looped = loop_metrics(labels, scores, counts)
        loop_seconds = time.perf_counter() - started
        started = time.perf_counter()
        vectorised = curve_metrics(labels, scores, counts)
        vector_seconds = time.perf_counter() - started
        gap = max(float(np.abs(np.quantile(looped[m], [0.025, 0.975]) - np.quantile(vectorised[m], [0.025, 0.975])).max())
                  for m in INTERVAL_METRICS)
        print(f"{n:>7} {args.resamples:>9} {loop_seconds:>8.2f} {vector_seconds:>12.3f} {loop_seconds / vector_seconds:>7.0f}x"
              f" {gap:>25.2e}")


if __name__ == "__main__":
    main()
