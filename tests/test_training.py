"""The expert training loop on a tiny backbone and tiny images made here: accelerate's training
state, per-loss logging, resume after a kill, unreadable files, the mixture and the entry point."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny_training import one_torch_thread, write_signal_images

from dfd_lib.cli import main as dfd_main
from dfd_lib.models.checkpoints import load_expert, load_mixture
from dfd_lib.models.demo_weights import demo_provenance
from dfd_lib.training.losses import LossConfig
from dfd_lib.training.mixture_training import train_mixture
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import BEST_WEIGHTS, CURVES_FILE, HISTORY_FILE, train_expert
from dfd_lib.training.training_state import STATE_DIR, read_training_state

BACKBONE = "test_efficientnet"


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine is shared: one thread per process avoids OpenMP oversubscription stalls
    with one_torch_thread():
        yield


@pytest.fixture
def images(tmp_path) -> pd.DataFrame:
    """24 noisy 40x48 images; fakes carry a learnable signal (a saturated red channel)."""
    return write_signal_images(tmp_path / "images", clusters=3)


def _config(**overrides) -> TrainConfig:
    settings = dict(backbone=BACKBONE, pretrained=False, image_size=32, epochs=2, batch_size=8, lr=3e-3,
                    warmup_epochs=0.5, seed=3, progress=False, loss=LossConfig(ce_weight=1.0, nce_weight=0.5, kl_weight=1.0))
    settings.update(overrides)
    return TrainConfig(**settings)


def test_one_epoch_writes_checkpoints_and_logs_each_loss(images, tmp_path):
    out = tmp_path / "run"
    result = train_expert(images.iloc[:16], images.iloc[16:], _config(epochs=1), out)
    for name in (BEST_WEIGHTS, HISTORY_FILE, "train_config.json"):
        assert (out / name).is_file(), name
    assert (out / STATE_DIR / "random_states_0.pkl").is_file()  # accelerate's save_state: RNG states too
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # atomic writes leave no temporary files behind
    history = pd.read_csv(out / HISTORY_FILE)
    assert len(history) == 1 and len(result.history) == 1
    for column in ("train_overall", "train_ce", "train_nce", "train_kl", "val_auc", "images_per_s", "data_share"):
        assert np.isfinite(history.loc[0, column]), column
    assert history.loc[0, "train_ce"] > 0 and history.loc[0, "train_nce"] > 0 and history.loc[0, "train_kl"] > 0
    assert history.loc[0, "train_images"] == 16  # 2 steps of 8
    state = read_training_state(out)
    assert state["progress"].epoch == 0 and state["progress"].global_step == 2
    assert {"model", "ema", "optimizer", "scheduler"} <= set(state)
    assert state["optimizer"]["state"], "optimizer moments are saved"
    assert state["scheduler"]["last_epoch"] == 2  # the schedule is registered for checkpointing, stepped per step
    expert, meta = load_expert(result.best_weights)
    assert meta["backbone"] == BACKBONE and meta["image_size"] == 32
    out_logits = expert(torch.zeros(2, 3, 32, 32))["logits"]
    assert out_logits.shape == (2, 2)
    assert result.best_epoch == 0 and result.selection == "val_auc"


def test_every_step_logs_its_losses_and_learning_rate_to_csv_and_tensorboard(images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = train_expert(images.iloc[:16], images.iloc[16:], _config(epochs=2), out)
    curves = pd.read_csv(out / CURVES_FILE)
    assert list(curves["step"]) == [1, 2, 3, 4] and list(curves["epoch"]) == [1, 1, 2, 2]
    # the parts add up to the total with the loss weights; the epoch means are the history's
    weighted = curves["loss_ce"] + 0.5 * curves["loss_nce"] + 1.0 * curves["loss_kl"]
    np.testing.assert_allclose(curves["loss_overall"], weighted, rtol=1e-5)
    np.testing.assert_allclose(curves.groupby("epoch")["loss_overall"].mean(), result.history["train_overall"], rtol=1e-5)
    assert curves["lr"].iloc[-1] < curves["lr"].iloc[0]  # the cosine decay is visible
    events = [p for p in (out / "tensorboard").rglob("events.out.tfevents.*")]
    assert events, "accelerate's TensorBoard tracker wrote no event file"
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in scalars.Scalars("loss/overall")] == [1, 2, 3, 4]
    assert [e.step for e in scalars.Scalars("val/auc")] == [2, 4]
    np.testing.assert_allclose([e.value for e in scalars.Scalars("lr")], curves["lr"], rtol=1e-6)


def test_curves_figure_draws_every_training(images, tmp_path):
    from dfd_lib.training.curves import plot_training_curves, read_curves

    for name, seed in (("expert_0", 1), ("expert_1", 2)):
        train_expert(images.iloc[:16], images.iloc[16:], _config(epochs=2, seed=seed, log_with=""), tmp_path / name)
    assert sorted(read_curves(tmp_path)["training"].unique()) == ["expert_0", "expert_1"]
    fig = plot_training_curves(tmp_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert all(len(ax.lines) == 2 for ax in fig.axes)  # four loss parts, lr and validation AUC: one line per training
    with pytest.raises(FileNotFoundError, match="run notebook 04"):
        read_curves(tmp_path / "nothing")


def test_no_tracker_still_writes_the_curves(images, tmp_path):
    out = tmp_path / "quiet"
    train_expert(images.iloc[:16], images.iloc[16:], _config(epochs=1, log_with=""), out)
    assert len(pd.read_csv(out / CURVES_FILE)) == 2 and not (out / "tensorboard").exists()


def test_disabled_losses_are_logged_as_zero(images, tmp_path):
    config = _config(epochs=1, loss=LossConfig(nce_weight=0, kl_weight=0))
    result = train_expert(images.iloc[:16], images.iloc[16:], config, tmp_path / "ce")
    row = result.history.iloc[0]
    assert row["train_nce"] == 0 and row["train_kl"] == 0
    assert row["train_overall"] == pytest.approx(row["train_ce"])


class Killed(Exception):
    pass


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a saved training state under one flat key: model, EMA, optimiser moments."""
    flat = {f"/model/{k}": v for k, v in state["model"].items()}
    flat.update({f"/ema/{k}": v for k, v in state["ema"].items()})
    for index, moments in state["optimizer"]["state"].items():
        flat.update({f"/optimizer/{index}/{k}": torch.as_tensor(v) for k, v in moments.items()})
    flat["/scheduler/last_epoch"] = torch.tensor(state["scheduler"]["last_epoch"])
    return flat


def test_resume_after_kill_matches_uninterrupted_run(images, tmp_path):
    train, val = images.iloc[:16], images.iloc[16:]
    config = _config(epochs=2)
    whole = train_expert(train, val, config, tmp_path / "whole")

    def kill_mid_epoch_two(epoch, step, global_step):
        if epoch == 1 and step == 0:
            raise Killed

    with pytest.raises(Killed):
        train_expert(train, val, config, tmp_path / "killed", on_step=kill_mid_epoch_two)
    assert read_training_state(tmp_path / "killed")["progress"].epoch == 0  # epoch 1 finished, epoch 2 not
    after_epoch_one = _tensors(read_training_state(tmp_path / "killed"))

    steps_seen = []
    resumed = train_expert(train, val, config, tmp_path / "killed", on_step=lambda e, s, g: steps_seen.append((e, s, g)))
    assert steps_seen == [(1, 0, 3), (1, 1, 4)]  # only epoch 2 ran again, with continuing step counts

    a = _tensors(read_training_state(tmp_path / "whole"))
    b = _tensors(read_training_state(tmp_path / "killed"))
    assert a.keys() == b.keys()
    model_keys = [k for k in a if k.startswith("/model/") or k.startswith("/ema/")]
    assert model_keys
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the comparison is not vacuous: epoch 2 moved the weights
    assert any(not torch.allclose(a[k], after_epoch_one[k]) for k in model_keys if a[k].is_floating_point())
    columns = ["train_overall", "train_ce", "train_nce", "train_kl", "val_auc", "val_loss", "lr"]
    pd.testing.assert_frame_equal(whole.history[columns], resumed.history[columns], rtol=1e-5)
    assert whole.best_epoch == resumed.best_epoch
    curves_whole, curves_resumed = pd.read_csv(tmp_path / "whole" / CURVES_FILE), pd.read_csv(tmp_path / "killed" / CURVES_FILE)
    pd.testing.assert_frame_equal(curves_whole, curves_resumed, rtol=1e-5)  # no step lost or logged twice
    best_a, best_b = load_file(whole.best_weights), load_file(resumed.best_weights)
    for key in best_a:
        torch.testing.assert_close(best_a[key], best_b[key], rtol=1e-5, atol=1e-6)


def test_a_training_is_reused_only_when_made_from_the_same_rows_settings_and_weights(images, tmp_path, caplog):
    train, val, out = images.iloc[:16], images.iloc[16:], tmp_path / "run"
    first = train_expert(train, val, _config(epochs=1), out)
    made = (out / BEST_WEIGHTS).stat().st_mtime_ns
    with caplog.at_level("INFO", logger="dfd_lib"):
        again = train_expert(train, val, _config(epochs=1, threads=1), out)  # how fast it runs is not what it computes
    assert (out / BEST_WEIGHTS).stat().st_mtime_ns == made and "reused" in caplog.text
    assert again.key == first.key and set(first.key) == {"train_rows", "val_rows", "config", "weights", "format"}
    caplog.clear()
    with caplog.at_level("INFO", logger="dfd_lib"):
        other = train_expert(train, val, _config(epochs=1, lr=1e-2), out)
    assert "run: retraining: its settings changed" in caplog.text and other.key["config"] != first.key["config"]
    assert other.config.lr == 1e-2 and len(other.history) == 1
    caplog.clear()
    swapped = pd.concat([train.iloc[:15], val.iloc[:1]], ignore_index=True)  # one training image replaced
    with caplog.at_level("INFO", logger="dfd_lib"):
        retrained = train_expert(swapped, val, _config(epochs=1, lr=1e-2), out)
    assert "run: retraining: its training rows changed" in caplog.text
    assert retrained.key["val_rows"] == other.key["val_rows"] and retrained.key["train_rows"] != other.key["train_rows"]
    steps = pd.read_csv(out / CURVES_FILE)["step"]
    assert steps.is_unique and steps.min() == 1 and set(pd.read_csv(out / CURVES_FILE)["epoch"]) == {1}  # nothing of the discarded runs


def test_unreadable_image_is_skipped_and_reported(images, tmp_path):
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    train = pd.concat([images.iloc[:15], pd.DataFrame([{"path": str(broken), "label": 1}])], ignore_index=True)
    result = train_expert(train, images.iloc[16:], _config(epochs=1), tmp_path / "run")
    assert list(result.skipped["path"]) == [str(broken)]
    assert result.skipped.loc[0, "reason"]
    assert result.history.loc[0, "train_images"] == 15


def test_train_mixture_saves_a_loadable_mixture(images, tmp_path):
    table = images.copy()
    for i in range(2):
        table[f"resplit_{i}"] = np.where(table["cluster"] == i, "val", "train")
    result = train_mixture(table, _config(epochs=1), tmp_path / "moe")
    assert list(result.summary["resplit"]) == [0, 1]
    assert [r.out_dir.name for r in result.experts] == ["expert_0", "expert_1"]
    model, config = load_mixture(result.directory)
    assert len(model.experts) == 2 and config.image_size == 32
    # the mixture's experts are the experts' best EMA weights
    expert0, _ = load_expert(result.experts[0].best_weights)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.experts[0](x)["logits"], expert0(x)["logits"])
        probs = model(x)["prob"]
    assert probs.shape == (3,) and bool(((probs >= 0) & (probs <= 1)).all())
    with pytest.raises(ValueError, match="not in the table"):
        train_mixture(table, _config(epochs=1), tmp_path / "moe2", resplits=[5])


def test_config_validation_and_yaml_numbers():
    assert TrainConfig(lr="1e-3", loss={"kl_weight": 0}).lr == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="int8")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="ce_weight"):
        TrainConfig(loss={"ce_weight": -1})


def test_entry_point_trains_from_config_file(images, tmp_path):
    from dfd_lib.data.manifest import Manifest

    train_csv = Manifest(images.iloc[:16].reset_index(drop=True)).save(tmp_path / "train.csv")
    val_csv = Manifest(images.iloc[16:].reset_index(drop=True)).save(tmp_path / "val.csv")
    config = _config(epochs=1).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    code = dfd_main(["train", "--config", str(tmp_path / "cfg.json"), "--train-table", str(train_csv), "--val-table",
                     str(val_csv), "--out-dir", str(tmp_path / "cli")])
    assert code == 0
    assert (tmp_path / "cli" / BEST_WEIGHTS).is_file()
    (tmp_path / "bad.json").write_text(json.dumps({"epochs": 0}))
    assert dfd_main(["train", "--config", str(tmp_path / "bad.json"), "--train-table", str(train_csv), "--val-table",
                     str(val_csv), "--out-dir", str(tmp_path / "cli2")]) == 1


def test_dataset_augmentation_is_seeded_per_epoch_and_sample(images):
    from dfd_lib.data.datasets import ManifestDataset, collate_skipping_unreadable

    dataset = ManifestDataset(images, 32, train=True, seed=1)
    first = dataset[5]["image"]
    assert torch.equal(first, dataset[5]["image"])  # same (seed, epoch, index): same crop and flip
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[5]["image"])
    dataset.set_epoch(0)
    assert torch.equal(first, dataset[5]["image"])
    batch = collate_skipping_unreadable([dataset[0], {"index": 9, "path": "x.png", "error": "not an image"}, dataset[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["index"].tolist() == [0, 1]
    assert batch["skipped"] == [("x.png", "not an image")]


def test_frozen_stages_keep_their_weights_and_statistics(images, tmp_path):
    from accelerate.utils import set_seed

    from dfd_lib.models.experts import Expert
    from dfd_lib.training.freezing import backbone_stage_groups, freeze_backbone_stages

    config = _config(epochs=1, freeze_stages=3)
    result = train_expert(images.iloc[:16], images.iloc[16:], config, tmp_path / "frozen")
    set_seed(config.seed)  # train_expert seeds, then builds the expert: the same initial weights
    initial = Expert(BACKBONE).state_dict()
    trained = read_training_state(tmp_path / "frozen")["model"]
    groups = backbone_stage_groups(Expert(BACKBONE))
    frozen_prefixes = tuple(f"baseline_extractor.{name.rsplit('.', 2)[0]}" for group in groups[:3] for name in group)
    frozen_keys = [k for k in initial if k.startswith(frozen_prefixes)]
    # weights and BatchNorm running statistics of the frozen stages: untouched
    assert any("running_mean" in k for k in frozen_keys)
    for key in frozen_keys:
        torch.testing.assert_close(trained[key], initial[key], msg=key)
    # the stages after them and the head did learn
    assert not torch.allclose(trained["baseline_extractor.classifier.weight"], initial["baseline_extractor.classifier.weight"])
    last_block = [k for k in initial if k.startswith("baseline_extractor.blocks.4") and k.endswith("weight")]
    assert any(not torch.allclose(trained[k], initial[k]) for k in last_block)
    assert result.seconds > 0
    # the head always trains: freezing every group is refused
    with pytest.raises(ValueError, match="head always trains"):
        freeze_backbone_stages(Expert(BACKBONE), len(groups))
    with pytest.raises(ValueError, match="freeze_stages"):
        TrainConfig(freeze_stages=-1)


def test_train_mixture_writes_the_mixture_where_asked(images, tmp_path):
    table = images.copy()
    for i in range(2):
        table[f"resplit_{i}"] = np.where(table["cluster"] == i, "val", "train")
    result = train_mixture(table, _config(epochs=1, max_steps_per_epoch=1), tmp_path / "experts", mixture_dir=tmp_path / "weights" / "moe",
                           provenance=demo_provenance())
    assert result.directory == tmp_path / "weights" / "moe"
    assert load_mixture(result.directory)[1].backbones == [BACKBONE, BACKBONE]
    provenance = json.loads((result.directory / "config.json").read_text())["provenance"]
    assert provenance == {**provenance, **demo_provenance()} and provenance["resplits"] == "0,1"  # joined with train_mixture's own
    assert not (tmp_path / "experts" / "mixture").exists() and result.seconds > 0


def test_gradient_accumulation_and_checkpointing_keep_the_result(images, tmp_path):
    """A smaller card: the same effective batch in micro-batches, or activations recomputed in the
    backward pass, trains the same weights. (A per-sample normalisation, GroupNorm, and CE alone make
    the split exact: BatchNorm statistics and the contrastive loss depend on the micro-batch.)"""
    settings = dict(backbone="test_efficientnet_gn", epochs=1, loss=LossConfig(nce_weight=0, kl_weight=0))
    train, val = images.iloc[:16], images.iloc[16:]
    whole = train_expert(train, val, _config(**settings), tmp_path / "whole")
    split = train_expert(train, val, _config(**settings, grad_accum_steps=4), tmp_path / "accum")
    recomputed = train_expert(train, val, _config(**settings, grad_checkpointing=True), tmp_path / "ckpt")
    reference = read_training_state(tmp_path / "whole")
    for name in ("accum", "ckpt"):
        other = read_training_state(tmp_path / name)
        assert other["progress"].global_step == reference["progress"].global_step == 2  # optimiser steps, not batches
        for key, value in reference["model"].items():
            torch.testing.assert_close(other["model"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    for result in (split, recomputed):
        assert result.history.loc[0, "train_images"] == whole.history.loc[0, "train_images"] == 16
        assert result.history.loc[0, "train_ce"] == pytest.approx(whole.history.loc[0, "train_ce"], rel=1e-4)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(batch_size=8, grad_accum_steps=3)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(images, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on this CPU-only machine: two CPU processes over
    gloo (accelerate's `--cpu` alone runs one process unless MPI is set up). Each takes half of every global
    batch and the gradients are averaged across them, so two processes of batch 4 train what one
    process of batch 8 trains, up to float rounding of the all-reduced sum (tolerance 1e-4 relative).
    GroupNorm and CE alone keep that exact; BatchNorm statistics and the contrastive loss would see
    per-process batches, and the KL noise per-process random streams."""
    import os
    import subprocess
    import sys

    from dfd_lib.data.manifest import Manifest

    train_csv = Manifest(images.iloc[:16].reset_index(drop=True)).save(tmp_path / "train.csv")
    val_csv = Manifest(images.iloc[16:].reset_index(drop=True)).save(tmp_path / "val.csv")
    settings = dict(backbone="test_efficientnet_gn", epochs=2, loss=LossConfig(nce_weight=0, kl_weight=0), threads=1)
    (tmp_path / "one.json").write_text(json.dumps(_config(**settings, batch_size=8).to_dict()))
    (tmp_path / "two.json").write_text(json.dumps(_config(**settings, batch_size=4).to_dict()))
    tables = ["--train-table", str(train_csv), "--val-table", str(val_csv)]
    assert dfd_main(["train", "--config", str(tmp_path / "one.json"), *tables, "--out-dir", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dfd_lib.training.cli",
              "--config", str(tmp_path / "two.json"), *tables, "--out-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-6000:]
    state = tmp_path / "two" / STATE_DIR
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()  # one per process
    one, two = read_training_state(tmp_path / "one"), read_training_state(tmp_path / "two")
    assert two["progress"].global_step == one["progress"].global_step == 4
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert [row["train_images"] for row in two["progress"].history] == [16, 16]  # both processes' images counted
    # started again, both processes load the saved state (each its own RNG) and find nothing left to train
    again = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-6000:]
    assert "two: reused: finished, made from the same rows, settings and weights" in again.stderr
    assert read_training_state(tmp_path / "two")["progress"].history == two["progress"].history
