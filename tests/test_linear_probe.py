"""The linear-probe baseline: a logistic regression on frozen embeddings, fit on the official train
rows with its C chosen on val. Made here: two Gaussian blobs of embeddings, a headline whose trained
models' scores are made in the test (no training), the ladder over it, and a tiny run folder that
notebook 01's embedding step fills (one test image that cannot be decoded)."""
from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dfd_lib.core import runs
from dfd_lib.data.manifest import Manifest
from dfd_lib.embed.embeddings import EmbeddingConfig, embed_run
from dfd_lib.evaluation import comparison, ladder_results
from dfd_lib.evaluation.ladder import PROBE_RUNG, PROBE_SOURCE, RUNGS, LadderTrainings
from dfd_lib.evaluation.linear_probe import (
    MISSING_SCORE,
    LinearProbeConfig,
    fit_linear_probe,
    fit_run_probe,
    probe_table,
)
from dfd_lib.stats.bootstrap import BootstrapConfig, paired_bootstrap
from dfd_lib.stats.metrics import binary_metrics
from dfd_lib.steps.train_moe import TrainMoeConfig

INTERVALS = BootstrapConfig(bootstrap_resamples=300, seed=0)
SPLITS = {"train": 160, "val": 60, "test": 80}


def _blobs(seed: int = 0, width: int = 24, gap: float = 1.2) -> tuple[np.ndarray, pd.DataFrame]:
    """Reals around 0, fakes around ``gap`` along every axis, in three official splits."""
    rng = np.random.default_rng(seed)
    parts, rows = [], []
    for split, n in SPLITS.items():
        labels = np.arange(n) % 2
        parts.append(rng.normal(size=(n, width)) + gap * labels[:, None] / np.sqrt(width) * 3)
        rows += [{"path": f"{split}/{i}.png", "split": split, "label": int(label),
                  "family": "real" if not label else ("splice" if i % 4 == 1 else "self_blend")}
                 for i, label in enumerate(labels)]
    return np.concatenate(parts).astype(np.float32), pd.DataFrame(rows)


def test_the_probe_separates_two_blobs_and_chooses_c_on_val():
    embeddings, table = _blobs()
    probe = fit_linear_probe(embeddings, table, LinearProbeConfig(), backbone="tiny")
    test = table[table["split"] == "test"]
    scores, missing = probe.scores_of(test)
    assert missing == 0 and binary_metrics(test["label"], scores)["auc"] > 0.9
    grid = probe_table(probe)
    assert list(grid.index) == [0.001, 0.01, 0.1, 1.0, 10.0] and grid["converged"].all() and grid["chosen"].sum() == 1
    assert probe.c == grid.index[grid["chosen"]][0] and probe.val_auc == grid["val_auc"].max()
    assert probe.n_train == SPLITS["train"] and probe.n_val == SPLITS["val"]
    assert probe.name == "linear probe on frozen tiny features"
    fixed = fit_linear_probe(embeddings, table, LinearProbeConfig(probe_c_grid=[0.5]))
    assert fixed.c == 0.5 and len(fixed.grid) == 1


def test_the_probe_is_deterministic():
    embeddings, table = _blobs()
    first = fit_linear_probe(embeddings, table)
    again = fit_linear_probe(embeddings.copy(), table.copy())
    pd.testing.assert_series_equal(first.scores, again.scores, check_exact=True)
    pd.testing.assert_frame_equal(first.grid, again.grid, check_exact=True)


def test_the_probe_refuses_one_class_and_a_bad_grid():
    embeddings, table = _blobs()
    val_reals = table["label"].where(table["split"] != "val", 0)
    with pytest.raises(ValueError, match="official val"):
        fit_linear_probe(embeddings, table.assign(label=val_reals))
    for grid in ([], [0.0], [-1.0], ["1"]):
        with pytest.raises(ValueError, match="probe_c_grid"):
            LinearProbeConfig(probe_c_grid=grid)
    config = TrainMoeConfig.from_params({"run_probe": False, "probe_c_grid": [2.0]})
    assert config.probe == LinearProbeConfig(run_probe=False, probe_c_grid=[2.0])


def _trained(name: str, backbone: str = "tiny_net"):
    """What the headline reads of a training: its weights file, backbone and selection."""
    return types.SimpleNamespace(best_weights=f"/nowhere/{name}.safetensors", config=types.SimpleNamespace(backbone=backbone),
                                 best_val_auc=0.7, best_epoch=0, seconds=1.0, history=pd.DataFrame({"images_per_s": [1.0]}))


OFFICIAL = _trained("official")
EXPERTS = types.SimpleNamespace(experts=[_trained("e0"), _trained("e1")], seconds=2.0,
                                summary=pd.DataFrame({"resplit": [0, 1], "backbone": ["tiny_net", "tiny_net"]}))


def _headline(monkeypatch, probe=None):
    """The headline over the blobs' test rows: the trained models' scores are noisy copies of the labels,
    made here (score_experts is replaced, nothing is trained or read)."""
    embeddings, table = _blobs()
    test = table[table["split"] == "test"].reset_index(drop=True)

    def made_scores(weights, rows, **_):
        rng = np.random.default_rng(1)
        labels = rows["label"].to_numpy()
        return pd.DataFrame({name: 1 / (1 + np.exp(-(labels * (k + 1) * 0.5 + rng.normal(size=len(rows)))))
                             for k, name in enumerate(weights)}, index=rows.index)

    monkeypatch.setattr(comparison, "score_experts", made_scores)
    return comparison.headline_comparison(test, OFFICIAL, EXPERTS, progress=False, bootstrap=INTERVALS, probe=probe), test


def _probe(drop_test_rows: int = 0):
    embeddings, table = _blobs()
    keep = np.ones(len(table), dtype=bool)
    keep[np.flatnonzero(table["split"] == "test")[:drop_test_rows]] = False  # images notebook 01 could not embed
    return fit_linear_probe(embeddings[keep], table[keep], backbone="tiny")


def test_the_probe_is_the_headlines_first_row_with_intervals_and_the_others_are_unchanged(monkeypatch):
    without, _ = _headline(monkeypatch)
    probe = _probe(drop_test_rows=1)
    headline, test = _headline(monkeypatch, probe)
    table = headline.table
    assert headline.probe_model == probe.name == table.index[0] and without.probe_model is None
    assert list(table["role"]) == ["linear probe", "official split", "cluster expert", "cluster expert", "mixture"]
    row = table.loc[probe.name]
    assert row["validated on"] == "official val" and row["val_auc"] == probe.val_auc and row["backbone"] == "tiny"
    assert row["test_auc_lo"] <= row["test_auc"] <= row["test_auc_hi"] and row["test_auc"] > 0.9
    assert row[comparison.metric_columns()].drop(["test_acc_at_0.5", "test_acc_at_eer"], errors="ignore").notna().all()
    scores, missing = probe.scores_of(test)
    assert missing == 1 and scores[0] == MISSING_SCORE  # the image without an embedding: no evidence either way
    assert row["test_auc"] == pytest.approx(binary_metrics(test["label"], scores)["auc"])
    assert "1 test image(s) without an embedding are scored 0.5" in headline.note and f"C={probe.c:g}" in headline.note
    pd.testing.assert_frame_equal(table.drop(index=probe.name), without.table)  # the probe only adds a row
    families = comparison.per_group_table(headline, by="family", bootstrap=INTERVALS)
    assert list(families.loc["splice"].index) == list(table.index)
    assert families.loc[("(all)", probe.name), "test_auc"] == pytest.approx(row["test_auc"])
    assert families.loc[("splice", probe.name), "test_auc_lo"] <= families.loc[("splice", probe.name), "test_auc"]
    metrics = comparison.summary_metrics(headline, OFFICIAL, EXPERTS)
    assert metrics["linear_probe_test_auc"] == pytest.approx(row["test_auc"])


def _ladder_trainings(headline) -> LadderTrainings:
    """Every trained rung taken from the headline's models (nothing to score again): rungs 1-3 the
    official-split model, rung 4 the first expert, rung 5 both experts."""
    weights = {name: type("Trained", (), {"best_weights": path})() for name, path in headline.weights.items()}
    names = list(headline.weights)
    rungs = {1: [weights[names[0]]], 2: [weights[names[0]]], 3: [weights[names[0]]], 4: [weights[names[1]]],
             5: [weights[names[1]], weights[names[2]]]}
    return LadderTrainings(resplit=0, seeds=[0, 1], rungs=[rungs, rungs], sources=[dict.fromkeys(rungs, "made in the test")] * 2,
                           trained=[], seconds=0.0)


def test_the_probe_is_the_ladders_first_rung_and_joins_the_holm_family(monkeypatch, tmp_path):
    probe = _probe()
    headline, _ = _headline(monkeypatch, probe)
    result = ladder_results.ladder_table(_ladder_trainings(headline), headline, bootstrap=INTERVALS, progress=False)
    table = result.table
    assert list(table.index) == [PROBE_RUNG.number, *(rung.number for rung in RUNGS)] == [0, 1, 2, 3, 4, 5]
    assert table.loc[0, "model"] == probe.name and table.loc[0, "adds"] == PROBE_RUNG.adds and table.loc[0, "from"] == PROBE_SOURCE
    assert table.loc[0, "test_auc"] == pytest.approx(headline.table.loc[probe.name, "test_auc"])
    assert table.loc[0, "test_auc_lo"] == pytest.approx(headline.table.loc[probe.name, "test_auc_lo"])
    assert table.loc[0, "test_auc_seed_sd"] == 0.0  # the probe is the same at every seed
    assert np.isnan(table.loc[0, "p_value"]) and table.loc[0, "verdict"] == ""
    # rung 1 is now compared with the probe, and that comparison counts in Holm's correction
    paired = paired_bootstrap(headline.labels, result.scores["0/1"].to_numpy(), result.scores["0/0"].to_numpy(), INTERVALS)
    assert table.loc[1, "p_value"] == pytest.approx(paired["p_value"])
    assert table.loc[1, "delta_auc"] == pytest.approx(table.loc[1, "test_auc"] - table.loc[0, "test_auc"])
    assert table.loc[1, "verdict"] in {"better than rung 0 (Holm)", "worse than rung 0 (Holm)", "no clear difference (Holm)"}
    assert int(table["p_value"].notna().sum()) == 5
    figure = ladder_results.plot_ladder(result, tmp_path / "ladder.png")
    assert "over its 5 comparisons" in figure.axes[0].get_title()
    without, _ = _headline(monkeypatch)
    assert list(ladder_results.ladder_table(_ladder_trainings(without), without, progress=False).table.index) == [1, 2, 3, 4, 5]


def test_the_probe_reads_the_embeddings_notebook_01_made(tmp_path):
    """A run folder as notebook 01 leaves it; one test image cannot be decoded, so it has no embedding."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):
        label, side = i % 2, ("test" if i >= 28 else "val" if i % 6 in (4, 5) else "train")
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        arr[..., 0] = 230 if label else arr[..., 0]  # a fake signal a frozen random network still sees
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(path)
        rows.append({"path": str(path), "label": label, "family": "splice" if label else "real", "source": "synthetic",
                     "group": f"g{i}", "width": 32, "height": 32, "hash": f"h{i}", "split": side, "cluster": None})
    (tmp_path / "images" / "35.png").write_bytes(b"not an image")
    run = runs.open_run(tmp_path / "run")
    Manifest(pd.DataFrame(rows)).save(run.path(runs.MANIFEST))
    table = Manifest.load(run.path(runs.MANIFEST)).table
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_run(run, table, EmbeddingConfig("test_efficientnet", pretrained=False, image_size=32, num_workers=0,
                                              device="cpu"), progress=False)
    finally:
        torch.set_num_threads(before)
    assert fit_run_probe(run, LinearProbeConfig(run_probe=False)) is None
    assert probe_table(None).empty
    probe = fit_run_probe(run, LinearProbeConfig(probe_c_grid=[1.0]))
    assert probe.backbone == "test_efficientnet" and probe.n_train + probe.n_val == 28
    scores, missing = probe.scores_of(table[table["split"] == "test"])
    assert missing == 1 and len(scores) == 8 and scores[-1] == MISSING_SCORE
    assert np.array_equal(scores, fit_run_probe(run, LinearProbeConfig(probe_c_grid=[1.0])).scores_of(
        table[table["split"] == "test"])[0])
