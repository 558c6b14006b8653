"""int8 post-training quantisation of the OpenVINO export with NNCF, as an option that is never
the default: it changes scores. ``dfd export WEIGHTS_DIR --int8 --calibration FOLDER`` writes it;
``Predictor.load(..., backend="openvino", int8=True)`` / ``dfd predict --backend openvino --int8``
use it. The speed gained and the scores moved (largest |Δp|, test AUC and TPR at 1 % FPR) are
measured by bench/bench_inference.py and recorded in bench/RESULTS.md.

Calibration images go through the Predictor's own preprocessing (decoding, resize,
normalisation), so what NNCF sees is what is scored; their digest is part of the export's key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dfd_lib.core.signal_stack import reinstall_signal_stack
from dfd_lib.data.images import ImageLoadError, is_image_path
from dfd_lib.models.checkpoints import CheckpointError, MixtureConfig
from dfd_lib.scoring.backends import require
from dfd_lib.scoring.export import (
    Export,
    ensure_export,
    export_identity,
    export_roots,
    find_export,
    mixture_config,
    write_export,
)
from dfd_lib.scoring.file_crops import decode_rgb
from dfd_lib.scoring.inputs import expand_inputs

PRECISION = "int8"
log = logging.getLogger(__name__)


def calibration_files(inputs: Sequence[str | os.PathLike], limit: int) -> list[Path]:
    """Up to ``limit`` image files from ``inputs`` (files, folders, globs), spread evenly over
    the sorted list so that every class and folder is represented."""
    paths, problems = expand_inputs([str(p) for p in inputs])
    for problem in problems:
        log.warning("calibration: %s", problem)
    images = [p for p in paths if is_image_path(p)]
    if not images:
        raise ValueError(f"no calibration images found in {', '.join(map(str, inputs))}")
    if len(images) > limit:
        images = [images[i] for i in np.linspace(0, len(images) - 1, limit).round().astype(int)]
    return images


def calibration_batches(files: Sequence[Path], config: MixtureConfig) -> list[np.ndarray]:
    """Each readable file as a ``(1, *config.input_shape)`` model input, preprocessed as the Predictor does."""
    transform = config.transform()
    batches = []
    for path in files:
        try:
            batches.append(transform(decode_rgb(path, config.preprocess))[None].numpy())
        except ImageLoadError as exc:
            log.warning("calibration: skipped %s: %s", path, exc.reason)
    if not batches:
        raise ValueError("none of the calibration images could be read")
    return batches


def files_digest(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def int8_identity(weights_dir: Path, config: MixtureConfig, calibration_digest: str) -> dict:
    return export_identity(weights_dir, "openvino", config, PRECISION, calibration_digest)


def quantize_ir(fp32_file: Path, batches: list[np.ndarray], out_file: Path) -> None:
    """NNCF's default post-training quantisation (int8 weights and activations, CPU)."""
    ov = require("int8", "openvino")
    nncf = require("int8", "nncf")
    model = ov.Core().read_model(str(fp32_file))
    try:
        quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    finally:
        reinstall_signal_stack()  # NNCF compiles and releases models (dfd_lib/core/signal_stack.py)
    ov.save_model(quantized, str(out_file), compress_to_fp16=False)


def ensure_int8_export(weights_dir: str | os.PathLike, calibration: Sequence[str | os.PathLike],
                       out: str | os.PathLike | None = None, backbones: Sequence[str] | None = None,
                       limit: int = 300, force: bool = False) -> Export:
    """The int8 OpenVINO export calibrated on ``calibration`` (the cached one when the weights
    and calibration images match), quantised from the fp32 export (made first if needed)."""
    require("int8", "nncf")
    weights_dir = Path(weights_dir)
    config = mixture_config(weights_dir, backbones)
    files = calibration_files(calibration, limit)
    identity = int8_identity(weights_dir, config, files_digest(files))
    roots = export_roots(weights_dir, Path(out) if out is not None else None)
    found = None if force else next(filter(None, (find_export(root, identity) for root in roots)), None)
    if found is not None:
        return found
    fp32 = ensure_export(weights_dir, "openvino", out, config.backbones)
    batches = calibration_batches(files, config)
    log.warning("quantising %s to int8 on %d calibration images", fp32.model_file, len(batches))
    return write_export(fp32.folder.parent, identity, lambda path: quantize_ir(fp32.model_file, batches, path), weights_dir,
                        extra={"calibration_images": len(batches), "calibration": [str(p) for p in calibration]})


def find_int8_export(weights_dir: Path, out: str | os.PathLike | None = None, backbones: Sequence[str] | None = None) -> Export:
    """The int8 export made from these very weights (whichever calibration set it used)."""
    config = mixture_config(weights_dir, backbones)
    current = export_identity(weights_dir, "openvino", config, PRECISION)
    for root in export_roots(weights_dir, Path(out) if out is not None else None):
        for folder in sorted(root.glob(f"openvino-{PRECISION}-*")):
            identity = {**current, "calibration_sha256": _recorded_calibration(folder)}
            found = find_export(root, identity)
            if found is not None:
                return found
    raise CheckpointError(f"{weights_dir}: no int8 export made from these weights; make one with "
                          f"`dfd export {weights_dir} --format openvino --int8 --calibration FOLDER`")


def _recorded_calibration(folder: Path) -> str:
    try:
        return json.loads((folder / "export.json").read_text(encoding="utf-8"))["identity"]["calibration_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
