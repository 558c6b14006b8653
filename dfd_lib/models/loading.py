"""Loading a mixture from a folder in either format: ours (:mod:`dfd_lib.models.checkpoints`) or the
original release's ``weight.pth`` + ``ema.state`` (:mod:`dfd_lib.models.released`)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dfd_lib.models import released
from dfd_lib.models.checkpoints import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, MixtureConfig, is_mixture_dir, load_mixture
from dfd_lib.models.experts import MixtureOfExperts


def load_weights(path: str | os.PathLike, backbones: Sequence[str] | None = None) -> tuple[MixtureOfExperts, MixtureConfig]:
    """Either format, told apart by the files in ``path``: ours, or the released ``weight.pth`` +
    ``ema.state`` (whose experts are ``backbones``, default the released 7)."""
    path = Path(path)
    if is_mixture_dir(path):
        return load_mixture(path)
    if released.is_released_dir(path):
        return released.load_released(path, backbones or released.ORIGINAL_BACKBONES)
    raise CheckpointError(
        f"{path}: no weights found: expected {WEIGHTS_FILE} + {CONFIG_FILE} (dfd-kit) or "
        f"{released.RELEASED_WEIGHTS_FILE} + {released.RELEASED_EMA_FILE} (the original release)"
    )
