"""An expert's training state on accelerate: ``save_state`` / ``load_state`` restore the model, the
optimiser, the grad scaler, every process's RNG states and the registered objects (the EMA and the
learning-rate schedule) together; :class:`Progress` (epochs done, steps, the best epoch, the
history and the config) is a small JSON file beside them.

The state of the last finished epoch lives in ``<out_dir>/state/``. It is written into a temporary
folder and swapped in (the JSON last, marking it complete), so a run killed at any point leaves the
previous state or the new one, never half of one. With ``TrainConfig.checkpointing_steps`` the state
is also saved within an epoch, every N optimiser steps, to ``<out_dir>/step_states/step-<global step>/``
(written the same way, under a temporary name renamed into place), with the unfinished epoch's running
totals in :attr:`Progress.partial`; only the newest ``checkpoints_total_limit`` are kept, and the
epoch's own state, once saved, supersedes them all. A resumed run continues from whichever complete
state is newest (:func:`find_latest_state`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from dfd_lib.core.faults import crash_point

STATE_DIR = "state"
STEPS_DIR = "step_states"
PROGRESS_FILE = "progress.json"
_STEP_PREFIX = "step-"


@dataclass
class Progress:
    """Where a training run stands after its last finished epoch."""

    epoch: int = -1  # the last finished epoch (0-based); -1 before the first
    global_step: int = 0
    best_epoch: int = -1
    best_score: float = -math.inf  # validation AUC, or minus the validation loss (see TrainResult.selection)
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    config: dict = field(default_factory=dict)  # the TrainConfig that made it
    key: dict = field(default_factory=dict)  # what it is made from (dfd_lib.training.training_key)
    weights_source: str = ""  # where its backbone's starting weights came from, when it started
    partial: dict = field(default_factory=dict)  # a step checkpoint's unfinished epoch (epoch_resume.EpochTotals); {} at epoch ends

    def record(self, row: dict, score: float) -> bool:
        """Add the epoch ``row``; ``True`` when it is the new best (the first epoch always is, so a run
        whose validation fails still yields weights)."""
        self.history.append(row)
        self.epoch = int(row["epoch"])
        self.partial = {}
        improved = self.best_epoch < 0 or (score == score and score > self.best_score)
        if improved:
            self.best_epoch, self.best_score = self.epoch, float(score) if score == score else -math.inf
        return improved


def _paths(out_dir: Path) -> tuple[Path, Path, Path]:
    return out_dir / STATE_DIR, out_dir / f".{STATE_DIR}.tmp", out_dir / f".{STATE_DIR}.old"


def find_state(out_dir: str | os.PathLike) -> Path | None:
    """The complete state folder of ``out_dir`` (after a kill mid-swap, the previous one), or None."""
    final, _tmp, old = _paths(Path(out_dir))
    for folder in (final, old):
        if (folder / PROGRESS_FILE).is_file():
            return folder
    return None


def read_progress(state_dir: str | os.PathLike) -> Progress:
    return Progress(**json.loads((Path(state_dir) / PROGRESS_FILE).read_text()))


def _write_state(accelerator, tmp: Path, progress: Progress) -> None:
    """The whole state into the fresh folder ``tmp``, the progress last (every process takes part)."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimiser, scaler, RNG of this process, EMA and schedule
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=1))


def save_training_state(accelerator, out_dir: str | os.PathLike, progress: Progress) -> Path:
    """Write the whole training state to ``out_dir/state`` (every process takes part)."""
    final, tmp, old = _paths(Path(out_dir))
    _write_state(accelerator, tmp, progress)
    if accelerator.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        crash_point("training.checkpoint")  # the tests kill here: neither state/ nor state.tmp/ is in place
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_step_state(accelerator, out_dir: str | os.PathLike, progress: Progress, keep: int) -> Path:
    """Write a step checkpoint (``progress.partial`` set) to ``out_dir/step_states/step-<global step>``,
    then remove all but the newest ``keep`` (every process takes part)."""
    folder = Path(out_dir) / STEPS_DIR / f"{_STEP_PREFIX}{progress.global_step:09d}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    _write_state(accelerator, tmp, progress)
    if accelerator.is_main_process:
        crash_point("training.checkpoint")  # the tests kill here: the new checkpoint is not in place yet
        shutil.rmtree(folder, ignore_errors=True)  # a run killed after this step's rename, then redone
        os.replace(tmp, folder)
        for stale in step_states(out_dir)[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return folder


def step_states(out_dir: str | os.PathLike) -> list[Path]:
    """The complete step checkpoints of ``out_dir``, oldest first (unfinished temporary folders left out)."""
    folder = Path(out_dir) / STEPS_DIR
    found = folder.glob(f"{_STEP_PREFIX}*") if folder.is_dir() else []
    return sorted(path for path in found if (path / PROGRESS_FILE).is_file())


def remove_step_states(out_dir: str | os.PathLike) -> None:
    """Remove every step checkpoint, complete or not: the state of a finished epoch supersedes them."""
    shutil.rmtree(Path(out_dir) / STEPS_DIR, ignore_errors=True)


def find_latest_state(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete state of ``out_dir``: the newest step checkpoint when it is further on than the
    last finished epoch's state (a kill mid-epoch), else that epoch's state; None when there is none."""
    epoch_state, steps = find_state(out_dir), step_states(out_dir)
    if not steps:
        return epoch_state
    if epoch_state is None or read_progress(steps[-1]).global_step > read_progress(epoch_state).global_step:
        return steps[-1]
    return epoch_state


def load_training_state(accelerator, state_dir: str | os.PathLike, optimizer) -> Progress:
    """Restore everything :func:`save_training_state` wrote into the prepared objects (``optimizer``:
    the prepared optimiser, whose loaded moments get their parameters' memory layout); the progress."""
    accelerator.load_state(str(state_dir))
    _match_strides(getattr(optimizer, "optimizer", optimizer))
    return read_progress(state_dir)


def _match_strides(optimizer: torch.optim.Optimizer) -> None:
    # loaded optimiser state is contiguous; give it its parameter's layout (channels_last)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def discard_training(out_dir: str | os.PathLike, files: tuple[str, ...]) -> None:
    """Remove a training's state and ``files`` (its weights, history, curves, tracker logs) from
    ``out_dir``, so a training made from other data or settings is never mixed into a new one."""
    out_dir = Path(out_dir)
    for folder in (*_paths(out_dir), out_dir / STEPS_DIR, *(out_dir / name for name in files)):
        if folder.is_dir():
            shutil.rmtree(folder)
        elif folder.exists():
            folder.unlink()


def read_training_state(out_dir: str | os.PathLike) -> dict:
    """The saved state of ``out_dir`` as plain dicts, for inspection and tests: ``model``, ``ema``
    (the registered EMA's state dict), ``optimizer``, ``scheduler`` and ``progress``."""
    folder = find_state(out_dir)
    if folder is None:
        raise FileNotFoundError(f"no complete training state in {out_dir}")
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=False)  # noqa: E731 - our own files
    return {"model": load_file(folder / "model.safetensors"), "ema": load("custom_checkpoint_0.pkl"),
            "scheduler": load("custom_checkpoint_1.pkl"), "optimizer": load("optimizer.bin"),
            "progress": read_progress(folder)}
