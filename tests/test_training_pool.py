"""Trainings in several processes at once (dfd_lib.training.training_pool): the same weights and histories as
one after another, a failed training reported without losing the others, and a folder written by one
training only."""
import logging

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from tiny_training import one_torch_thread, write_signal_images

from dfd_lib.training.losses import LossConfig
from dfd_lib.training.mixture_training import resplit_job, train_mixture
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import BEST_WEIGHTS
from dfd_lib.training.training_pool import TrainingFailed, TrainingJob, run_trainings


def _timing(column: str) -> bool:
    """How long a training took, and how fast: the only history columns that may differ."""
    return "seconds" in column or column.endswith("_per_s") or column == "data_share"


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def table(tmp_path) -> pd.DataFrame:
    images = write_signal_images(tmp_path / "images", clusters=3)
    for i in range(3):
        images[f"resplit_{i}"] = np.where(images["cluster"] == i, "val", "train")
    return images


def _config(**overrides) -> TrainConfig:
    # threads 1 in every process: a training's float sums then run in one order wherever it runs
    settings = dict(backbone="test_efficientnet", pretrained=False, image_size=32, epochs=2, batch_size=8, lr=3e-3,
                    warmup_epochs=0.5, seed=3, progress=False, threads=1, max_steps_per_epoch=2,
                    loss=LossConfig(ce_weight=1.0, nce_weight=0.5, kl_weight=1.0))
    settings.update(overrides)
    return TrainConfig(**settings)


def _same_history(a: pd.DataFrame, b: pd.DataFrame) -> None:
    kept = [c for c in a.columns if not _timing(c)]
    assert list(a.columns) == list(b.columns) and len(kept) > 10
    pd.testing.assert_frame_equal(a[kept].reset_index(drop=True), b[kept].reset_index(drop=True))


def test_two_processes_train_the_same_experts_as_one_after_another(table, tmp_path):
    configs = [_config(seed=3 + i) for i in range(3)]  # each expert its own seed: a mix-up between them would show
    serial = train_mixture(table, configs, tmp_path / "serial")
    pooled = train_mixture(table, configs, tmp_path / "pooled", processes=2)
    assert [r.out_dir.name for r in pooled.experts] == ["expert_0", "expert_1", "expert_2"]
    for one, other in zip(serial.experts, pooled.experts):
        first, second = load_file(one.best_weights), load_file(other.best_weights)
        assert first.keys() == second.keys()
        for name in first:
            assert bool((first[name] == second[name]).all()), f"{other.out_dir.name}: {name} differs"
        _same_history(one.history, other.history)
        assert one.best_epoch == other.best_epoch and one.key == other.key
    pd.testing.assert_frame_equal(serial.summary.drop(columns=["images_per_s", "seconds"]),
                                  pooled.summary.drop(columns=["images_per_s", "seconds"]))
    assert load_file(serial.directory / "model.safetensors").keys() == load_file(pooled.directory / "model.safetensors").keys()


def test_a_failed_training_is_reported_after_the_others_finish(table, tmp_path):
    good = resplit_job(table, 0, _config(epochs=1), tmp_path / "good")
    bad = TrainingJob(table.iloc[:1], table.iloc[1:2], _config(epochs=1), tmp_path / "bad")  # one training row: refused
    with pytest.raises(TrainingFailed, match=r"1 of 2 trainings failed, the first in .*bad: ValueError: need >= 2 training"):
        run_trainings([bad, good], processes=2)
    assert (tmp_path / "good" / BEST_WEIGHTS).is_file()  # the other training ran to its end and is kept
    again = run_trainings([good], processes=2)  # a rerun reuses it (one job: in this process)
    assert again[0].best_weights == tmp_path / "good" / BEST_WEIGHTS


def test_two_trainings_never_share_a_folder(table, tmp_path):
    job = resplit_job(table, 0, _config(), tmp_path / "same")
    with pytest.raises(ValueError, match="same folder"):
        run_trainings([job, resplit_job(table, 1, _config(), tmp_path / "same")], processes=2)
    with pytest.raises(ValueError, match="an int >= 1"):
        run_trainings([job], processes=0)


def test_an_accelerate_group_trains_one_model_at_a_time(table, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch --num_processes 2 sets it
    with pytest.raises(ValueError, match="inside an accelerate launch group of 2"):
        run_trainings([resplit_job(table, 0, _config(), tmp_path / "a")], processes=2)


def test_the_pools_messages_reach_the_callers_log_once(table, tmp_path, caplog):
    jobs = [resplit_job(table, i, _config(epochs=1, progress=True), tmp_path / f"expert_{i}") for i in range(2)]
    with caplog.at_level(logging.INFO, logger="dfd_lib"):
        run_trainings(jobs, processes=2)
    summaries = [r for r in caplog.records if "epoch 1/1: loss" in r.getMessage()]
    # each training's epoch summary, logged in its process, handled once by this process's logger
    assert sorted(r.getMessage().split()[0] for r in summaries) == ["expert_0", "expert_1"]
    assert {r.name for r in summaries} == {"dfd_lib.training.trainer"} and {r.processName for r in summaries} != {"MainProcess"}
