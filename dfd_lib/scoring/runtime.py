"""A mixture ready to score on a CPU runtime (OpenVINO, ONNX Runtime): its cached export
(:mod:`dfd_lib.scoring.export`, or the int8 one of :mod:`dfd_lib.scoring.quantize`), opened for the
:class:`~dfd_lib.scoring.predictor.Predictor`."""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from dfd_lib.models.checkpoints import MixtureConfig
from dfd_lib.models.experts import MixtureOfExperts
from dfd_lib.models.loading import load_weights
from dfd_lib.scoring.backends import EXPORT_FORMAT, ConvertedMixture, check_backend, open_runtime, require
from dfd_lib.scoring.export import ensure_export, mixture_config
from dfd_lib.scoring.quantize import find_int8_export

log = logging.getLogger(__name__)


def load_runtime(weights_dir: str | os.PathLike, backend: str, threads: int | None = None,
                 backbones: Sequence[str] | None = None, int8: bool = False,
                 export_dir: str | os.PathLike | None = None) -> tuple[ConvertedMixture, MixtureConfig]:
    """The mixture in ``weights_dir`` ready to score with ``backend`` (its cached export, made
    first when missing), and its config. ``int8``: the int8 export ``dfd export --int8`` made."""
    if check_backend(backend) == "torch":
        raise ValueError("backend 'torch' needs no export")
    if int8 and backend != "openvino":
        raise ValueError("int8 runs on the openvino backend only")
    require("int8" if int8 else backend, "nncf" if int8 else backend)  # say what to install before hashing gigabytes
    weights_dir = Path(weights_dir)
    config = mixture_config(weights_dir, backbones)
    if int8:
        export = find_int8_export(weights_dir, export_dir, config.backbones)
        log.warning("int8 model %s: faster, but its scores differ from the fp32 mixture's (bench/RESULTS.md)", export.model_file)
    else:
        export = ensure_export(weights_dir, EXPORT_FORMAT[backend], export_dir, config.backbones)
    loader = functools.partial(_torch_mixture, weights_dir, config.backbones)
    return open_runtime(backend, export.model_file, threads, loader), config


def _torch_mixture(weights_dir: Path, backbones: Sequence[str]) -> MixtureOfExperts:
    return load_weights(weights_dir, backbones)[0]
