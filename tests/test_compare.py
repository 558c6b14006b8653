"""``dfd compare`` on run folders made in the test: what counts as a difference and what does not."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from dfd_lib.pipeline.compare import CLOSE, DIFFERS, IDENTICAL, ONLY_B, _array_difference, compare_runs


def _run(root, auc: float, seconds: float, date: str, threshold: float = 0.6):
    root.mkdir(parents=True)
    (root / "params.json").write_text(json.dumps({"profile": "smoke", "steps": {}}))
    (root / "tables").mkdir()
    pd.DataFrame({"model": ["a"], "auc": [auc], "train_seconds": [seconds]}).to_csv(root / "tables" / "04_headline.csv", index=False)
    manifest = pd.DataFrame({"path": [f"{root}/augmented/x.png"], "label": [1]})
    manifest.to_csv(root / "augmented_manifest.csv", index=False)
    (root / "weights" / "moe").mkdir(parents=True)
    config = {"image_size": 64, "calibration": {"threshold": threshold, "date": date}}
    (root / "weights" / "moe" / "config.json").write_text(json.dumps(config))
    np.save(root / "umap.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    metrics = {"04_train_moe": {"auc": auc, "seconds": {"experts": seconds}, "validated on": "cluster 0"}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_timings_clock_readings_and_run_paths_are_not_differences(tmp_path):
    a = _run(tmp_path / "a", 0.75, 12.5, "2026-11-30T04:15:41+00:00")
    b = _run(tmp_path / "b", 0.75, 13.9, "2026-11-30T05:01:02+00:00")
    comparison = compare_runs(a, b)
    assert comparison.agree, comparison.to_text()
    status = {f.path: f.status for f in comparison.files}
    assert status["umap.npy"] == IDENTICAL
    assert status["augmented_manifest.csv"] == CLOSE  # equal once each run's own folder is set aside
    assert status["weights/moe/config.json"] == CLOSE and status["tables/04_headline.csv"] == CLOSE
    assert comparison.timings_skipped == 1 and len(comparison.metrics) == 2


def test_a_changed_figure_a_changed_record_and_a_missing_file_are_differences(tmp_path):
    a = _run(tmp_path / "a", 0.75, 12.5, "d")
    b = _run(tmp_path / "b", 0.7501, 12.5, "d", threshold=0.61)
    (b / "tables" / "04_ladder.csv").write_text("rung,auc\n1,0.6\n")
    comparison = compare_runs(a, b)
    assert not comparison.agree
    status = {f.path: f.status for f in comparison.files}
    assert status["tables/04_headline.csv"] == DIFFERS and status["weights/moe/config.json"] == DIFFERS
    assert status["tables/04_ladder.csv"] == ONLY_B
    text = comparison.to_text()
    assert "04_train_moe.auc: 0.75 vs 0.7501" in text and "calibration.threshold" in text and "the runs DIFFER" in text
    assert compare_runs(a, b, tolerance=0.05).files != [] and not compare_runs(a, b, tolerance=0.05).agree  # a file only in B


def test_equal_infinities_are_equal_and_others_differ(tmp_path):
    """An odds ratio or a log-loss can be infinite; the same infinity at the same place in both runs is no difference."""
    def with_infinities(root, ratio: float, odds: float, cells: list[float]):
        pd.DataFrame({"path": [f"{root}/x.png"], "ratio": [ratio], "floor": [-math.inf]}).to_csv(root / "tables" / "04_odds.csv",
                                                                                               index=False)
        np.save(root / "embeddings.npy", np.array(cells))  # not under a compared folder: checked through _array_difference
        metrics = json.loads((root / "metrics.json").read_text())
        metrics["04_train_moe"]["odds"] = odds
        (root / "metrics.json").write_text(json.dumps(metrics))
        return root

    a = with_infinities(_run(tmp_path / "a", 0.75, 12.5, "d"), math.inf, math.inf, [1.0, math.inf])
    b = with_infinities(_run(tmp_path / "b", 0.75, 12.5, "d"), math.inf, math.inf, [1.0, math.inf])
    comparison = compare_runs(a, b)
    assert comparison.agree, comparison.to_text()
    assert {f.path: f.status for f in comparison.files}["tables/04_odds.csv"] == CLOSE
    assert _array_difference(np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy"))[0] == 0.0

    c = with_infinities(_run(tmp_path / "c", 0.75, 12.5, "d"), 5.0, -math.inf, [1.0, -math.inf])
    other = compare_runs(a, c)
    assert not other.agree and {f.path: f.status for f in other.files}["tables/04_odds.csv"] == DIFFERS
    assert "04_train_moe.odds: inf vs -inf" in other.to_text()
    assert _array_difference(np.load(a / "embeddings.npy"), np.load(c / "embeddings.npy"))[0] == math.inf
