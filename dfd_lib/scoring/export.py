"""The mixture converted for a CPU runtime (``dfd export``, :mod:`dfd_lib.scoring.export_cli`),
cached beside the weights and keyed so that a stale export is never used.

An export lives in ``WEIGHTS_DIR/exports/<format>-<precision>-<key>/`` (or under ``--out``): the
model (``model.xml`` + ``model.bin``, or ``model.onnx``) and ``export.json``, written last, so a
folder without it is an interrupted conversion and is ignored. ``key`` is a digest of the
weights files' contents, the experts, the image size, the runtime's and torch's versions (and,
for int8, the calibration images): change the weights (or upgrade OpenVINO) and the old export no
longer matches; it is removed when the new one is written. Only exports of the same weights are
removed so: those made from the same weights folder (``export.json`` records it) or from the same
weights file, and every older one beside the weights; several mixtures can share one ``--out`` /
``--export-dir`` and each keeps its export.

Converting is a one-off cost: about a minute and 3 GB of memory (4 GB for ONNX) for the released
7-expert mixture at 512 px (bench/RESULTS.md); loading the export afterwards takes seconds. The model is
converted in fp32 (the IR is saved without fp16 compression) so scores match torch's. Before it is traced,
its ConvNeXt blocks are rewritten into an equivalent channels-first form that CPU runtimes run faster
(:mod:`dfd_lib.scoring.export_rewrites`, checked against the unrewritten mixture; ``export.json`` lists
what was rewritten).
"""
from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfd_lib.models.checkpoints import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, MixtureConfig, read_config
from dfd_lib.models.experts import ORIGINAL_BACKBONES, MixtureOfExperts
from dfd_lib.models.loading import load_weights
from dfd_lib.models.released import RELEASED_EMA_FILE, RELEASED_WEIGHTS_FILE, is_released_dir
from dfd_lib.scoring.backends import (
    OUTPUT_NAMES,
    openvino_ir,
    require,
    runtime_version,
)
from dfd_lib.scoring.export_rewrites import rewrite_verified

FORMATS = ("openvino", "onnx")
MODEL_FILE = {"openvino": "model.xml", "onnx": "model.onnx"}
EXPORTS_DIR = "exports"
META_FILE = "export.json"
EXPORT_VERSION = 2  # 2: experts rewritten before conversion (export_rewrites)
ONNX_OPSET = 17
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Export:
    """A usable export: its model file and what it was made from."""

    model_file: Path
    meta: dict
    converted: bool  # True: converted by this call; False: found in the cache

    @property
    def folder(self) -> Path:
        return self.model_file.parent


# --------------------------------------------------------------------------- the key


def weights_files(weights_dir: Path) -> list[Path]:
    """The files holding the weights (not config.json: a new verdict threshold keeps the export)."""
    if (weights_dir / WEIGHTS_FILE).is_file():
        return [weights_dir / WEIGHTS_FILE]
    if is_released_dir(weights_dir):
        return [weights_dir / RELEASED_WEIGHTS_FILE, weights_dir / RELEASED_EMA_FILE]
    raise CheckpointError(f"{weights_dir}: no weights found ({WEIGHTS_FILE}, or {RELEASED_WEIGHTS_FILE} + {RELEASED_EMA_FILE})")


def file_digest(paths: Sequence[Path], chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def mixture_config(weights_dir: Path, backbones: Sequence[str] | None = None) -> MixtureConfig:
    """The config of the mixture in ``weights_dir`` without loading its tensors."""
    if (weights_dir / CONFIG_FILE).is_file():
        return read_config(weights_dir)
    return MixtureConfig(backbones=list(backbones or ORIGINAL_BACKBONES), preprocess="compat")


def export_identity(weights_dir: Path, fmt: str, config: MixtureConfig, precision: str = "fp32",
                    calibration_digest: str = "") -> dict:
    """What an export depends on; its digest names the export's folder."""
    identity = {"export_version": EXPORT_VERSION, "format": fmt, "precision": precision,
                "weights_sha256": file_digest(weights_files(weights_dir)), "backbones": list(config.backbones),
                "image_size": config.image_size, "runtime": runtime_version(fmt), "torch": torch.__version__,
                "calibration_sha256": calibration_digest}
    if not config.shared_input:  # experts with their own preprocessing: a tiled input (an older export's key stays)
        identity["expert_inputs"] = config.expert_inputs
    return identity


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def export_roots(weights_dir: Path, out: Path | None = None) -> list[Path]:
    """Where exports are looked for, the first writable one being where a new one goes: ``out``
    if given, else beside the weights, then (read-only weights) the user's cache."""
    if out is not None:
        return [Path(out)]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dfd-kit" / EXPORTS_DIR
    return [weights_dir / EXPORTS_DIR, cache / hashlib.sha256(str(weights_dir.resolve()).encode()).hexdigest()[:16]]


def _writable(folder: Path) -> bool:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return os.access(existing, os.W_OK)


def find_export(root: Path, identity: dict) -> Export | None:
    """The finished export matching ``identity`` under ``root``, else None."""
    folder = root / f"{identity['format']}-{identity['precision']}-{identity_key(identity)}"
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    model_file = folder / MODEL_FILE[identity["format"]]
    if meta.get("identity") != identity or not model_file.is_file():
        return None
    return Export(model_file, meta, converted=False)


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def superseded(meta: dict, identity: dict, weights_dir: Path, private_root: bool) -> bool:
    """Whether the export described by ``meta`` is replaced by the one of ``identity``, made from
    ``weights_dir``: it lies in a root only this weights folder uses (beside the weights, or its user
    cache), or it was made from the same weights (an older runtime, torch or export version), or from
    the same weights folder (older weights there). Another mixture's export in a shared folder is none
    of these."""
    recorded = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    return (private_root or recorded.get("weights_sha256") == identity["weights_sha256"]
            or meta.get("weights_dir") == str(weights_dir.resolve()))


def remove_stale(root: Path, identity: dict, keep: Path, weights_dir: Path) -> list[Path]:
    """Other exports of the same format and precision under ``root`` made from the same weights
    (:func:`superseded`): never used again, so their disk space is given back. Folders whose
    ``export.json`` cannot be read are left alone."""
    private_root = root.resolve() in {path.resolve() for path in export_roots(weights_dir)}
    removed = []
    for folder in root.glob(f"{identity['format']}-{identity['precision']}-*"):
        if folder == keep or not folder.is_dir():
            continue
        meta = _read_meta(folder)
        if meta is not None and superseded(meta, identity, weights_dir, private_root):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


# --------------------------------------------------------------------------- converting


class _Probabilities(nn.Module):
    """The mixture with tensor outputs only (``prob``, ``expert_probs``): what the runtimes run (a mixture with
    localisation heads is exported without its map: ``dfd predict --maps`` and the server draw maps in torch)."""

    def __init__(self, mixture: MixtureOfExperts):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mixture(x, maps=False)
        return out["prob"], out["expert_probs"]


def _input_shape(image_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``(3, S, S)`` for a side, else the given ``(3, H, W)`` (a tiled input: ``MixtureConfig.input_shape``)."""
    return (3, image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)


def convert_openvino(model: MixtureOfExperts, image_size: int | Sequence[int], model_file: Path) -> dict:
    """The OpenVINO IR of ``model`` (any batch; the runtime compiles it for one image at a time) for inputs of
    side ``image_size`` (or of shape ``(3, H, W)``), rewritten first (:mod:`~dfd_lib.scoring.export_rewrites`).
    Returns what goes into ``export.json``."""
    ov = require("openvino", "openvino")
    shape = _input_shape(image_size)
    rewrites = rewrite_verified(model.eval(), shape)
    example = torch.zeros(1, *shape)
    converted = openvino_ir(_Probabilities(model), example, input=[ov.PartialShape([-1, *shape])])
    for output, name in zip(converted.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    ov.save_model(converted, str(model_file), compress_to_fp16=False)  # fp16 weights would move the scores
    return {"rewrites": rewrites}


def convert_onnx(model: MixtureOfExperts, image_size: int | Sequence[int], model_file: Path) -> dict:
    """The ONNX model of ``model`` (any batch), rewritten first like the OpenVINO IR."""
    require("onnx", "onnx")
    shape = _input_shape(image_size)
    rewrites = rewrite_verified(model.eval(), shape)
    example = torch.zeros(1, *shape)
    with torch.no_grad():
        torch.onnx.export(_Probabilities(model).eval(), (example,), str(model_file), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}, "expert_probs": {0: "batch"}})
    return {"rewrites": rewrites}


CONVERTERS = {"openvino": convert_openvino, "onnx": convert_onnx}


def write_export(root: Path, identity: dict, build, weights_dir: Path, extra: dict | None = None) -> Export:
    """Build an export of the weights in ``weights_dir`` into a temporary folder under ``root`` with
    ``build(model_file)`` (which may return a dict for ``export.json``), then move it into place with
    its ``export.json``; the exports it supersedes are removed (:func:`remove_stale`)."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{identity['format']}-{identity['precision']}-{identity_key(identity)}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".export-", dir=root) as tmp:
        model_file = Path(tmp) / MODEL_FILE[identity["format"]]
        built = build(model_file) or {}
        meta = {"identity": identity, "weights_dir": str(Path(weights_dir).resolve()),
                "seconds": round(time.perf_counter() - started, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **built, **(extra or {})}
        (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        Path(tmp).mkdir()  # TemporaryDirectory removes its (now moved) folder on exit
    for stale in remove_stale(root, identity, keep=folder, weights_dir=Path(weights_dir)):
        log.info("removed stale export %s (made from older weights in %s or by another runtime version)", stale, weights_dir)
    return Export(folder / MODEL_FILE[identity["format"]], meta, converted=True)


def _release_memory() -> None:
    """Give the conversion's buffers (gigabytes at full scale) back before scoring starts."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def ensure_export(weights_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None,
                  backbones: Sequence[str] | None = None, convert: bool = True, force: bool = False) -> Export:
    """The fp32 export of the mixture in ``weights_dir``: the cached one when its key matches,
    else converted now (when ``convert``; else CheckpointError saying how to make it)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    weights_dir = Path(weights_dir)
    config = mixture_config(weights_dir, backbones)
    identity = export_identity(weights_dir, fmt, config)
    roots = export_roots(weights_dir, Path(out) if out is not None else None)
    found = None if force else next(filter(None, (find_export(root, identity) for root in roots)), None)
    if found is not None:
        return found
    root = next((r for r in roots if _writable(r)), roots[0])
    if not convert:
        raise CheckpointError(f"{weights_dir}: no up-to-date {fmt} export under {root}; make it with "
                              f"`dfd export {weights_dir} --format {fmt}`")
    log.warning("converting the mixture in %s to %s (%d experts at %s px): a one-off cost, about a minute and "
                "3-4 GB of memory for the released 7 experts at 512 px; later loads use the cached export under %s",
                weights_dir, fmt, len(config.backbones), "/".join(map(str, dict.fromkeys(config.expert_sizes))), root)
    try:
        shape = config.image_size if config.shared_input else config.input_shape
        build = functools.partial(CONVERTERS[fmt], load_weights(weights_dir, config.backbones)[0], shape)
        return write_export(root, identity, build, weights_dir)
    finally:
        build = None
        _release_memory()
