"""Checkpoints within an epoch (``TrainConfig.checkpointing_steps``): a training killed mid-epoch — for
real, by SIGKILL in a subprocess (``DFD_CRASH_AT``, :mod:`dfd_lib.core.faults`) — resumes at the exact
step and ends with the weights, EMA, optimiser, schedule, histories and curves of an uninterrupted
training; only the newest ``checkpoints_total_limit`` step checkpoints stay; a step checkpoint made
with other settings is not resumed. A tiny backbone on tiny images made here, on the CPU."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny_training import one_torch_thread, write_signal_images

from dfd_lib.data.manifest import Manifest
from dfd_lib.training.losses import LossConfig
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import CURVES_FILE, train_expert
from dfd_lib.training.training_state import STEPS_DIR, read_training_state, step_states

ROOT = Path(__file__).resolve().parents[1]
HISTORY = ["epoch", "lr", "train_overall", "train_ce", "train_nce", "train_kl", "train_images", "val_auc", "val_loss"]


class Killed(Exception):
    pass


@pytest.fixture(autouse=True)
def one_thread():
    # one thread: float sums in one order, so a resumed training can equal an uninterrupted one bit for bit
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    """24 noisy 40x48 images; fakes carry a learnable signal (a saturated red channel)."""
    return write_signal_images(tmp_path_factory.mktemp("images"))


def _config(**overrides) -> TrainConfig:
    """4 optimiser steps per epoch (16 rows, batch 4), 2 epochs, a step checkpoint every 3 steps: at global
    steps 3 (epoch 1) and 6 (epoch 2), both mid-epoch. All three losses: the KL term's noise draws from the
    RNG, so a resume that restored it wrong would show."""
    settings = dict(backbone="test_efficientnet", pretrained=False, image_size=32, epochs=2, batch_size=4, lr=3e-3,
                    warmup_epochs=0.5, seed=3, progress=False, threads=1, log_with="", checkpointing_steps=3,
                    loss=LossConfig(ce_weight=1.0, nce_weight=0.5, kl_weight=1.0))
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def whole(images, tmp_path_factory):
    """The uninterrupted training every resumed one must equal."""
    with one_torch_thread():
        return train_expert(images.iloc[:16], images.iloc[16:], _config(), tmp_path_factory.mktemp("whole") / "run")


def _assert_same_training(whole, resumed) -> None:
    """Model, EMA, optimiser moments, schedule, history, curves and best weights equal, exactly."""
    a, b = read_training_state(whole.out_dir), read_training_state(resumed.out_dir)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}/{key}"
    for index, moments in a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key])), f"optimizer/{index}/{key}"
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    pd.testing.assert_frame_equal(whole.history[HISTORY], resumed.history[HISTORY], check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(whole.out_dir / CURVES_FILE), pd.read_csv(resumed.out_dir / CURVES_FILE),
                                  check_exact=True)  # every step once, none lost or logged twice
    best_a, best_b = load_file(whole.best_weights), load_file(resumed.best_weights)
    assert all(torch.equal(best_a[key], best_b[key]) for key in best_a)
    assert not step_states(resumed.out_dir)  # the last epoch's state superseded them


def _killed_run(images, tmp_path, crash_at: str) -> Path:
    """``dfd train`` in a subprocess that SIGKILLs itself at ``crash_at``; its out_dir."""
    train_csv = Manifest(images.iloc[:16].reset_index(drop=True)).save(tmp_path / "train.csv")
    val_csv = Manifest(images.iloc[16:].reset_index(drop=True)).save(tmp_path / "val.csv")
    (tmp_path / "config.json").write_text(json.dumps(_config().to_dict()))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dfd_lib.training.cli", "--config", str(tmp_path / "config.json"),
               "--train-table", str(train_csv), "--val-table", str(val_csv), "--out-dir", str(out)]
    env = {**os.environ, "DFD_CRASH_AT": crash_at, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("DFD_PIPELINE_STEP", None)  # the spec has no step part: it fires in any process
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL, done.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("crash_at", "states_left", "steps_redone"), [
    # killed after global step 7: the step-6 checkpoint of epoch 2 is the newest state
    ("training.step:7", ["step-000000006"], [(1, 2, 7), (1, 3, 8)]),
    # killed inside the step-6 checkpoint's write (3rd checkpoint: step 3, epoch 1's state, step 6): its
    # temporary folder is ignored and epoch 1's state, which removed the step-3 checkpoint, is the newest
    ("training.checkpoint:3", [], [(1, 0, 5), (1, 1, 6), (1, 2, 7), (1, 3, 8)]),
])
def test_a_training_killed_mid_epoch_resumes_at_the_exact_step(images, whole, tmp_path, caplog, crash_at, states_left,
                                                               steps_redone):
    out = _killed_run(images, tmp_path, crash_at)
    assert [path.name for path in step_states(out)] == states_left
    assert read_training_state(out)["progress"].epoch == 0  # the epoch state: after the first epoch
    redone = []
    with caplog.at_level("INFO", logger="dfd_lib"):
        resumed = train_expert(images.iloc[:16], images.iloc[16:], _config(), out, on_step=lambda *at: redone.append(at))
    assert redone == steps_redone  # only what was lost ran again, from the exact step, with continuing step counts
    assert ("resuming at step 3 of 4 in epoch 2 of 2" if states_left else "resuming after epoch 1 of 2") in caplog.text
    _assert_same_training(whole, resumed)


def test_only_the_newest_step_checkpoints_are_kept(images, whole, tmp_path, caplog):
    """A checkpoint every step, 2 kept; the epoch's state removes them; resumed in-process after an exception."""
    out, seen = tmp_path / "run", {}

    def watch(epoch, step, global_step):  # called before this step's own checkpoint
        seen[global_step] = [int(path.name.split("-")[1]) for path in step_states(out)]
        if global_step == 8:
            raise Killed

    config = _config(checkpointing_steps=1, checkpoints_total_limit=2)  # how often it saves: not what it computes
    with pytest.raises(Killed):
        train_expert(images.iloc[:16], images.iloc[16:], config, out, on_step=watch)
    # no checkpoint after an epoch's last step (4, 8): its own state follows; an epoch's state removes them all
    assert seen == {1: [], 2: [1], 3: [1, 2], 4: [2, 3], 5: [], 6: [5], 7: [5, 6], 8: [6, 7]}
    assert sorted(path.name for path in (out / STEPS_DIR).iterdir()) == ["step-000000006", "step-000000007"]
    redone = []
    with caplog.at_level("INFO", logger="dfd_lib"):
        resumed = train_expert(images.iloc[:16], images.iloc[16:], config, out, on_step=lambda *at: redone.append(at))
    assert redone == [(1, 3, 8)] and "run: resuming at step 4 of 4 in epoch 2 of 2" in caplog.text
    _assert_same_training(whole, resumed)


def test_a_step_checkpoint_made_with_other_settings_is_not_resumed(images, tmp_path, caplog):
    out = tmp_path / "run"

    def kill_at_step_two(epoch, step, global_step):
        if global_step == 2:
            raise Killed

    with pytest.raises(Killed):
        train_expert(images.iloc[:16], images.iloc[16:], _config(epochs=1, checkpointing_steps=1), out, on_step=kill_at_step_two)
    assert [path.name for path in step_states(out)] == ["step-000000001"] and not (out / "state").exists()
    redone = []
    with caplog.at_level("INFO", logger="dfd_lib"):
        other = train_expert(images.iloc[:16], images.iloc[16:], _config(epochs=1, checkpointing_steps=1, lr=1e-2), out,
                             on_step=lambda *at: redone.append(at))
    assert "run: retraining: its settings changed" in caplog.text
    assert redone[0] == (0, 0, 1) and len(redone) == 4  # from the start
    assert other.history["train_images"].tolist() == [16] and not step_states(out)


def test_checkpoint_settings_are_validated_and_not_part_of_the_key():
    with pytest.raises(ValueError, match="checkpointing_steps"):
        TrainConfig(checkpointing_steps=-1)
    with pytest.raises(ValueError, match="checkpoints_total_limit"):
        TrainConfig(checkpoints_total_limit=0)
    assert TrainConfig().checkpointing_steps == 0  # at epoch ends only, as before
    assert TrainConfig(checkpointing_steps=500, checkpoints_total_limit=3).result_settings() == TrainConfig().result_settings()
