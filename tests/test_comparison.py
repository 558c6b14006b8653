"""Notebook 04's comparison on a tiny run folder made here: the official-split model, the
experts and their mixture scored on the test split, the per-group tables, the loss ablation,
robustness, the recorded metrics and the multi-GPU hand-off through the launch files."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dfd_lib.cli import main as dfd_main
from dfd_lib.core import runs
from dfd_lib.core.paths import PROJECT_ROOT
from dfd_lib.data import resplit_table
from dfd_lib.data.manifest import Manifest
from dfd_lib.embed import resplits
from dfd_lib.evaluation import ablation, comparison, ladder, ladder_results
from dfd_lib.evaluation.robustness import mixture_robustness
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.stats.bootstrap import BootstrapConfig
from dfd_lib.stats.metrics import binary_metrics
from dfd_lib.stats.roc_plot import plot_roc_curves
from dfd_lib.training import training_data
from dfd_lib.training.losses import LossConfig
from dfd_lib.training.mixture_training import train_mixture
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.training_state import PROGRESS_FILE, STATE_DIR

LAST_STATE = f"{STATE_DIR}/{PROGRESS_FILE}"  # rewritten after every epoch a run trains

BACKBONE = "test_efficientnet"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared test machine: no OpenMP oversubscription
    yield
    torch.set_num_threads(before)


def _image(path, label, rng):
    arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    if label:
        arr[..., 0] = 230  # a learnable fake signal
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as notebooks 01-03 leave it: 36 train/val rows in 3 clusters, 12 test rows
    of two fake families, and 6 augmented rows (one from a test source, which must be dropped)."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        label = i % 2
        side = "test" if i >= 36 else ("val" if i % 6 in (4, 5) else "train")
        family = ("real" if not label else ("splice" if side != "test" else ("sd_inpaint" if i % 4 == 1 else "self_blend")))
        rows.append({"path": _image(root / "images" / f"{i}.png", label, rng), "label": label, "family": family,
                     "source": "synthetic", "group": f"g{i}", "width": 48, "height": 40, "hash": f"h{i}", "split": side,
                     "cluster": None})
    manifest = pd.DataFrame(rows)
    run = runs.open_run(root)
    Manifest(manifest).save(run.path(runs.MANIFEST))
    trainval = manifest[manifest["split"] != "test"].reset_index(drop=True)
    trainval["cluster"] = [i % 3 for i in range(len(trainval))]
    resplit_table.save_resplits(resplits.leave_one_cluster_out(trainval), run.path(runs.RESPLITS))
    augmented = []
    for j, source in enumerate([0, 1, 2, 3, 6, 40]):  # 40 is a test image: no re-split, dropped
        src = manifest.iloc[source]
        augmented.append({**src.to_dict(), "path": _image(root / runs.AUGMENTED_DIR / f"a{j}.png", int(src["label"]), rng),
                          "family": "degraded" if src["label"] == 0 else "self_blend", "parent": src["path"], "hash": f"a{j}"})
    Manifest(pd.DataFrame(augmented)).save(run.path(runs.AUGMENTED_MANIFEST))
    return run


def _base(**overrides) -> TrainConfig:
    settings = dict(backbone=BACKBONE, pretrained=False, image_size=32, epochs=1, batch_size=8, lr=3e-3, seed=1,
                    progress=False, loss=LossConfig(nce_weight=0.5, kl_fraction=0.5))
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(run):
    data = training_data.load_training_data(run, use_augmented=True, max_experts=2)
    configs = training_data.expert_configs(_base(), [BACKBONE], [], len(data.resplits))
    experts_dir = run.path(runs.EXPERTS_DIR)
    official = comparison.train_official_split(data.trainval, configs[0], experts_dir / training_data.OFFICIAL_DIR)
    experts = train_mixture(data.trainval, configs, experts_dir, resplits=data.resplits, mixture_dir=run.path(runs.MOE_WEIGHTS))
    return data, configs, official, experts


def test_model_a_and_the_experts_train_together_as_they_train_apart(run, trained, tmp_path):
    data, configs, official, experts = trained
    one_thread = [dataclasses.replace(c, threads=1) for c in configs]  # every process on one thread: the same sums
    first, mixture = comparison.train_official_and_experts(data, one_thread, tmp_path / "pooled", mixture_dir=tmp_path / "moe",
                                                           processes=2)
    assert first.out_dir == tmp_path / "pooled" / training_data.OFFICIAL_DIR
    assert [r.out_dir.name for r in mixture.experts] == ["expert_0", "expert_1"] and (tmp_path / "moe" / "config.json").is_file()
    for alone, together in zip([official, *experts.experts], [first, *mixture.experts]):
        assert alone.key == together.key  # the same rows, settings and starting weights (threads are not part of the key)
    apart = comparison.train_official_split(data.trainval, one_thread[0], tmp_path / "apart")  # in this process
    a, b = load_file(apart.best_weights), load_file(first.best_weights)
    assert a.keys() == b.keys() and all(bool((a[name] == b[name]).all()) for name in a)


def test_training_data_attaches_augmented_rows_and_keeps_test_apart(run):
    data = training_data.load_training_data(run, use_augmented=True, max_experts=2)
    assert data.resplits == [0, 1]
    assert data.augmented == 5 and "5 augmented" in data.note  # the test-sourced one is dropped
    assert len(data.test) == 12 and set(data.test["split"]) == {"test"}
    assert not set(data.test["path"]) & set(data.trainval["path"])
    summary = data.summary()
    assert summary.loc["test (cross-domain)", "total"] == 12
    assert summary.loc["official train", "total"] + summary.loc["official val", "total"] == 36 + 5
    # an augmented image sits on its source's side of every re-split
    rows = data.trainval.set_index("path")
    for _, row in data.trainval[data.trainval["augmented"]].iterrows():
        source = rows.loc[row["parent"]]
        assert row["resplit_0"] == source["resplit_0"] and row["resplit_1"] == source["resplit_1"]
    plain = training_data.load_training_data(run, use_augmented=False)
    assert plain.augmented == 0 and "off" in plain.note and plain.resplits == [0, 1, 2]


def test_expert_configs_cycle_backbones_and_weights():
    configs = training_data.expert_configs(_base(), ["a_net", "b_net"], ["weights/a.pth", ""], 3)
    assert [c.backbone for c in configs] == ["a_net", "b_net", "a_net"]
    a_weights = str(PROJECT_ROOT / "weights" / "a.pth")  # relative paths: from the project root, not the cwd
    assert [c.weights_path for c in configs] == [a_weights, "", a_weights]
    assert training_data.expert_configs(_base(), [BACKBONE], "", 1)[0].weights_path == ""
    with pytest.raises(ValueError, match="backbones"):
        training_data.expert_configs(_base(), [], [], 2)


INTERVALS = BootstrapConfig(bootstrap_resamples=200)


def test_headline_table_roc_and_group_tables(run, trained, tmp_path):
    data, _, official, experts = trained
    headline = comparison.headline_comparison(data.test, official, experts, batch_size=8, progress=False, bootstrap=INTERVALS)
    table = headline.table
    assert list(table["role"]) == ["official split", "cluster expert", "cluster expert", "mixture"]
    for column in ("val_auc", "test_auc", "test_ap", "test_eer", "test_tpr_at_fpr_1%", "test_tpr_at_fpr_0.1%",
                   "test_threshold_at_fpr_1%", "test_acc_at_0.5", "test_acc_at_eer", "test_auc_lo", "test_tpr_at_fpr_1%_hi"):
        assert column in table.columns
    assert (table["n_test"] == 12).all() and headline.unreadable == 0
    # every figure is the one binary_metrics gives on the same scores, inside its interval
    for name in table.index:
        expected = binary_metrics(headline.labels, headline.scores[name])
        for metric in ("auc", "ap", "eer", "tpr_at_fpr_1%", "tpr_at_fpr_0.1%", "threshold_at_fpr_0.1%"):
            assert table.loc[name, f"test_{metric}"] == pytest.approx(expected[metric]), metric
        assert table.loc[name, "test_auc_lo"] <= table.loc[name, "test_auc"] <= table.loc[name, "test_auc_hi"]
    # the mixture row is the saved mixture, as dfd predict scores it
    mixture_name = table.index[-1]
    saved = Predictor.load(run.path(runs.MOE_WEIGHTS), device="cpu", malloc_tuning=False).predict_paths(data.test["path"], progress=False)
    np.testing.assert_allclose(headline.scores[mixture_name], saved["prob_fake"], atol=1e-6)
    np.testing.assert_allclose(headline.scores[mixture_name], headline.scores[list(table.index[1:3])].mean(axis=1), atol=1e-12)
    # the ROC figure holds one curve per model, the interval of the emphasised ones shaded
    path = tmp_path / "roc.png"
    figure = plot_roc_curves(headline.curves(), path, emphasis=headline.main_models, bootstrap=INTERVALS)
    assert path.is_file() and len(figure.axes[0].lines) == 4 + 1  # + chance line
    assert len(figure.axes[0].collections) == 2  # two shaded bands: the official-split model and the mixture
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("official split (AUC") and "[" in legend[0] and "bootstrap interval" in legend[-1]
    families = comparison.per_group_table(headline, by="family", bootstrap=INTERVALS)
    assert list(families.index.get_level_values(0).unique()) == ["sd_inpaint", "self_blend", "(all)"]  # reals alone: no row
    assert list(families.loc["sd_inpaint"].index) == list(table.index)  # one row per model
    assert families.loc[("(all)", mixture_name), "test_auc"] == pytest.approx(table.loc[mixture_name, "test_auc"])
    assert families.loc[("sd_inpaint", mixture_name), "images"] == 3
    for column in ("test_tpr_at_fpr_1%", "test_tpr_at_fpr_0.1%", "test_auc_lo", "test_auc_hi"):
        assert families[column].notna().all(), column
    clusters = comparison.per_cluster_table(data, experts, headline)
    assert list(clusters.index) == [0, 1]
    assert clusters.loc[0, "held-out AUC"] == pytest.approx(experts.experts[0].best_val_auc)
    assert clusters.loc[0, "test TPR@1% FPR"] == table.iloc[1]["test_tpr_at_fpr_1%"]
    assert clusters.loc[0, "test AUC low"] == table.iloc[1]["test_auc_lo"]
    assert clusters.loc[0, "val images"] == int((data.trainval["resplit_0"] == "val").sum())


def test_ablation_reuses_the_all_three_expert_only_at_the_same_budget(run, trained):
    data, _, _, experts = trained
    same = ablation.loss_ablation(data.trainval, experts, run.path(runs.EXPERTS_DIR), resplit=1)
    assert same.reused == ablation.ALL_LOSSES and same.results[ablation.ALL_LOSSES] is experts.experts[1]
    weights = {name: (r.config.loss.nce_weight, r.config.loss.kl_weight) for name, r in same.results.items()}
    assert weights == {"CE only": (0, 0), "CE + NCE": (0.5, 0), "CE + KL": (0, 1.0), "CE + NCE + KL": (0.5, 1.0)}
    table = ablation.ablation_table(same, data.test, batch_size=8, progress=False)
    assert list(table.index) == list(ablation.ABLATION_VARIANTS) and table["reused"].sum() == 1
    assert table["test_auc"].between(0, 1).all() and (table["steps"] > 0).all()
    shorter = ablation.loss_ablation(data.trainval, experts, run.path(runs.EXPERTS_DIR) / "short", resplit=1, max_steps_per_epoch=1)
    assert shorter.reused is None and len(shorter.results) == 4  # all four at the shorter budget
    assert all(r.history["train_images"].iloc[0] == 8 for r in shorter.results.values())
    off = ablation.loss_ablation(data.trainval, experts, run.path(runs.EXPERTS_DIR), enabled=False)
    assert off.results == {} and ablation.ablation_table(off, data.test).empty
    with pytest.raises(ValueError, match="no expert"):
        ablation.loss_ablation(data.trainval, experts, run.path(runs.EXPERTS_DIR), resplit=2)


def test_robustness_and_recorded_metrics(run, trained, tmp_path):
    data, _, official, experts = trained
    robust = mixture_robustness(run.path(runs.MOE_WEIGHTS), data.test, {"jpeg": [50], "blur": [1.0]},
                                            max_images=8, batch_size=8, figure_path=tmp_path / "rob.png")
    assert list(robust.table["perturbation"]) == ["none", "jpeg", "blur"] and robust.images == 8
    assert (robust.table["n"] == 8).all() and (tmp_path / "rob.png").is_file()
    assert mixture_robustness(run.path(runs.MOE_WEIGHTS), data.test, enabled=False).table.empty
    headline = comparison.headline_comparison(data.test, official, experts, batch_size=8, progress=False)
    values = comparison.summary_metrics(headline, official, experts, None, robust)
    metrics = run.record_metrics("04_train_moe", values)["04_train_moe"]
    json.dumps(metrics)
    assert metrics["mixture_test_auc"] == pytest.approx(headline.table["test_auc"].iloc[-1], abs=1e-4)
    assert set(metrics["robustness_auc"]) == {"none", "jpeg 50", "blur 1"}
    assert metrics["seconds"]["experts"] > 0


def test_launch_files_hand_trainings_over_to_the_notebook(run, tmp_path):
    """What `accelerate launch -m dfd_lib.training.cli` trains from the launch files, a rerun of the
    notebook's training call finds finished: same folder, same settings, no step trained again."""
    data = training_data.load_training_data(run, max_experts=1)
    configs = training_data.expert_configs(_base(seed=5), [BACKBONE], [], 1)
    experts_dir = tmp_path / "experts"
    commands = training_data.write_launch_files(experts_dir, data, configs, configs[0])
    lines = [line.split() for line in commands.splitlines() if line.startswith("accelerate launch")]
    assert len(lines) == 2  # the official-split model and one expert
    assert dfd_main(["train", *lines[1][lines[1].index("--config"):]]) == 0  # the same arguments without accelerate
    before = (experts_dir / "expert_0" / LAST_STATE).stat().st_mtime_ns
    result = train_mixture(data.trainval, configs, experts_dir, resplits=data.resplits, mixture_dir=tmp_path / "moe")
    assert (experts_dir / "expert_0" / LAST_STATE).stat().st_mtime_ns == before
    assert len(result.experts[0].history) == 1 and (tmp_path / "moe" / "model.safetensors").is_file()
    assert dfd_main(["train", *lines[0][lines[0].index("--config"):]]) == 0  # the official-split model, from its two tables
    official_last = experts_dir / training_data.OFFICIAL_DIR / LAST_STATE
    before = official_last.stat().st_mtime_ns
    official = comparison.train_official_split(data.trainval, configs[0], experts_dir / training_data.OFFICIAL_DIR)
    assert official_last.stat().st_mtime_ns == before and official.best_weights.is_file()


def _state_times(folder):
    return {path: path.stat().st_mtime_ns for path in folder.glob(f"*/{LAST_STATE}")}


def test_the_ladder_trains_only_what_the_run_lacks(run, trained, tmp_path):
    data, configs, official, experts = trained
    experts_dir = run.path(runs.EXPERTS_DIR)
    ablated = ablation.loss_ablation(data.trainval, experts, experts_dir, resplit=1)
    before = _state_times(experts_dir)
    trainings = ladder.train_ladder(data, configs, official, experts, ablated, tmp_path / "ladder", resplit=1, seeds=1)
    rungs = trainings.rungs[0]
    assert rungs[3][0] is ablated.results["CE only"] and rungs[4][0] is experts.experts[1]
    assert len(rungs[5]) == 2 and all(a is b for a, b in zip(rungs[5], experts.experts))
    # only the two official-split CE-only models are new, and no training of the run ran again
    assert [r.out_dir.name for r in trainings.trained] == ["official_ce_no_enrichment", "official_ce"]
    assert _state_times(experts_dir) == before
    assert list(trainings.summary()["from"]) == ["trained for the ladder", "trained for the ladder", "loss ablation: CE only",
                                                 "expert 1 (cluster 1 held out)", "the run's 2 experts"]
    # one budget: the experts' schedule and settings, only the losses differ
    assert all(r.config.same_run_as(ladder.ce_only(configs[1]).to_dict()) for r in (rungs[1][0], rungs[2][0], rungs[3][0]))

    headline = comparison.headline_comparison(data.test, official, experts, batch_size=8, progress=False, bootstrap=INTERVALS)
    result = ladder_results.ladder_table(trainings, headline, bootstrap=INTERVALS, batch_size=8, progress=False)
    table = result.table
    assert list(table.index) == [1, 2, 3, 4, 5] and (table["n_seeds"] == 1).all()
    assert table.loc[4, "test_auc"] == pytest.approx(headline.table["test_auc"].iloc[2])  # expert 1, scored once
    assert table.loc[5, "test_auc"] == pytest.approx(headline.table["test_auc"].iloc[-1])  # the mixture
    ablation_scores = ablation.ablation_table(ablated, data.test, batch_size=8, progress=False)
    assert table.loc[3, "test_auc"] == pytest.approx(ablation_scores.loc["CE only", "test_auc"])
    for column in ("test_auc_lo", "test_auc_hi", "test_tpr_at_fpr_1%", "test_tpr_at_fpr_0.1%_hi", "test_eer_seed_mean"):
        assert table[column].notna().all(), column
    assert table["test_auc_seed_sd"].isna().all()  # one seed: no spread
    assert table.loc[1, "verdict"] == "" and set(table.loc[2:, "verdict"]) <= {"no clear difference (Holm)"} | {
        f"{word} than rung {n} (Holm)" for word in ("better", "worse") for n in range(1, 5)}
    assert table.loc[2, "delta_auc"] == pytest.approx(table.loc[2, "test_auc"] - table.loc[1, "test_auc"])
    figure = ladder_results.plot_ladder(result, tmp_path / "ladder.png")
    assert (tmp_path / "ladder.png").is_file() and len(figure.axes) == 2
    values = comparison.summary_metrics(headline, official, experts, ladder=result)
    recorded = run.record_metrics("04_train_moe", values)["04_train_moe"]["ladder"]
    assert list(recorded) == [f"{n} {name}" for n, name in zip(table.index, table["model"])]
    assert recorded["5 + mixture"]["auc"] == pytest.approx(table.loc[5, "test_auc"], abs=1e-4)
    assert recorded["5 + mixture"]["auc_lo"] <= recorded["5 + mixture"]["auc"] <= recorded["5 + mixture"]["auc_hi"]


def test_ladder_seeds_train_every_rung_again_once_and_resume(run, trained, tmp_path):
    data, configs, official, experts = trained
    # two at a time, each in its own process; the rerun below, in this process, finds every one finished
    trainings = ladder.train_ladder(data, configs, official, experts, None, tmp_path / "ladder", resplit=0, seeds=2, processes=2)
    assert trainings.seeds == [1, 2]
    # seed 1 (the run's): rungs 1-3 are new (no ablation to reuse); seed 2: rungs 1-3 and both experts,
    # rung 4 being one of them
    assert len(trainings.trained) == 3 + 5 and len({r.out_dir for r in trainings.trained}) == 8
    assert trainings.rungs[1][4][0] is trainings.rungs[1][5][0]
    assert all(r.config.seed == 2 for r in trainings.rungs[1][5])
    before = _state_times(tmp_path / "ladder" / "seed_2")
    again = ladder.train_ladder(data, configs, official, experts, None, tmp_path / "ladder", resplit=0, seeds=2)
    assert _state_times(tmp_path / "ladder" / "seed_2") == before and len(again.trained) == 8  # found finished, not retrained
    headline = comparison.headline_comparison(data.test, official, experts, batch_size=8, progress=False)
    result = ladder_results.ladder_table(trainings, headline, bootstrap=INTERVALS, batch_size=8, progress=False)
    assert (result.table["n_seeds"] == 2).all() and result.table["test_auc_seed_sd"].notna().all()
    assert len(result.per_seed) == 10
    mean = result.per_seed.groupby("rung")["test_auc"].mean()
    assert result.table["test_auc_seed_mean"].to_numpy() == pytest.approx(mean.to_numpy())
    off = ladder.train_ladder(data, configs, official, experts, None, tmp_path / "none", seeds=0)
    assert not off.enabled and ladder_results.ladder_table(off, headline).table.empty
    with pytest.raises(ValueError, match="no expert"):
        ladder.train_ladder(data, configs, official, experts, None, tmp_path / "x", resplit=5)
