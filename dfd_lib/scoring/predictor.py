"""Scoring images with a mixture of experts: load once, then batched, gradient-free forwards.

Speed without changing the scores (figures in bench/RESULTS.md, "Inference"):
- the EMA weights are folded in once at load (the original swapped them in and out around
  every forward) and weights load through the meta device with ``mmap``;
- ``torch.inference_mode``, batches, channels_last memory layout on the CPU;
- glibc is told to keep freed memory (:func:`tune_malloc`), otherwise each batch page-faults
  its activation buffers back in and batching looks slower than one image at a time.
``torch.compile`` is faster per image but compiles for minutes per input shape: opt-in.
bf16 autocast is opt-in and GPU-only (on this CPU it is slower and moves probabilities).
``backend="openvino"`` (or ``"onnxruntime"``) runs the forward pass on a converted model, cached
beside the weights (:mod:`dfd_lib.scoring.backends`, :mod:`dfd_lib.scoring.export`): same scores
within 1e-5, faster on CPUs; everything else here stays the same code.

Experts that differ in preprocessing (a ViT at 224 px beside CNNs at 512 px, ``MixtureConfig.expert_inputs``)
each get their own resized and normalised image, tiled into one input tensor per image
(:class:`dfd_lib.data.preprocess.TiledTransform`), so every path below (batches, runtimes, server) is unchanged.

Preprocessing modes (both end with the same tensor ops, :class:`dfd_lib.data.preprocess.InputTransform`:
to [0, 1], normalisation, then a resize to ``image_size`` x ``image_size`` with antialiasing — the
original's order, and the one training validates with):
- ``compat`` decodes files and bytes with OpenCV (BGR -> RGB) exactly as the original did,
  after :func:`dfd_lib.data.images.load_rgb` has vetted them (missing, truncated, not-an-image and
  oversized files are reported instead of being scored as grey). OpenCV drops transparency
  and truncates 16-bit images to their high byte.
- ``default`` decodes with :func:`dfd_lib.data.images.load_rgb` (Pillow), the decoder every other
  part of the kit uses: EXIF orientation applied, transparency flattened onto white,
  16-bit and float images scaled by their range. For ordinary 8-bit JPEG/PNG files the two
  modes give the same pixels.
PIL images and arrays (RGB order) are used as given in both modes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dfd_lib.core.logs import progress_bar
from dfd_lib.data.images import ImageLoadError, ImageSource
from dfd_lib.models.checkpoints import PREPROCESS_MODES, MixtureConfig
from dfd_lib.models.experts import MixtureOfExperts
from dfd_lib.models.loading import load_weights
from dfd_lib.scoring.backends import ConvertedMixture
from dfd_lib.scoring.default_weights import find_weights
from dfd_lib.scoring.file_crops import decode_rgb
from dfd_lib.scoring.maps import full_resolution
from dfd_lib.scoring.runtime import load_runtime

# glibc mallopt parameters (malloc.h): the same as
# GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 100_000_000_000


@functools.cache  # find_library runs `ldconfig -p` in a subprocess: once per process is enough
def _glibc():
    """The C library when it is glibc (whose ``mallopt`` the two functions below set), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS after every
    batch (large activation buffers are otherwise mmap'ed and page-faulted in each time).
    Takes effect for later allocations, so it can be called at run time; ``False`` where
    the C library is not glibc. Peak memory is unchanged; memory is held until exit."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def cap_malloc_arenas() -> bool:
    """At most one glibc memory pool ("arena") per core instead of glibc's 8 per core: a server decodes
    in many threads and, with trimming off (:func:`tune_malloc`), each pool stays at its peak. Measured in
    bench/bench_soak.py (RESULTS.md): RSS under load levels off about 80 MB lower, no loss of rate.
    ``False`` off glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, os.cpu_count() or 1))


def _materialize(model: MixtureOfExperts, device: torch.device, memory_format: torch.memory_format) -> MixtureOfExperts:
    """Copy every weight into ordinary memory on ``device`` in ``memory_format``. Checkpoints
    load memory-mapped; once no tensor refers to the file its mapping is dropped, so the
    pages read at load time do not stay resident beside the copies."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            fmt = memory_format if tensor.dim() == 4 else torch.contiguous_format
            tensor.data = tensor.data.to(device, memory_format=fmt, copy=True)
    return model


@dataclass
class Prediction:
    """One input's score: ``prob`` is the mixture's fake probability; ``error`` says why an
    input could not be scored (then ``prob`` is None)."""

    source: str
    prob: float | None
    expert_probs: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def describe_source(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} #{index}>"


def auto_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """A loaded mixture ready to score images. Build it with :meth:`load`."""

    def __init__(
        self,
        model: MixtureOfExperts,
        config: MixtureConfig,
        device: str | torch.device | None = None,
        batch_size: int = 4,
        preprocess: str = "default",
        bf16: bool = False,
        channels_last: bool | None = None,
        compile: bool = False,
        runtime: ConvertedMixture | None = None,
    ):
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else auto_device()
        if bf16 and self.device.type != "cuda":
            raise ValueError("bf16 autocast is GPU-only: on the CPU it is slower and moves probabilities")
        self.config = config
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.bf16 = bf16
        # channels_last measured faster on this CPU (bench/RESULTS.md) and on GPUs for convnets.
        self.channels_last = True if channels_last is None else channels_last
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if runtime is not None and self.device.type != "cpu":
            raise ValueError(f"the {runtime.backend} backend runs on the CPU; use backend='torch' on {self.device}")
        # a converted model does the forward pass (runtime); the torch one is then loaded only if asked for (Grad-CAM)
        self.runtime = runtime
        self.backend = runtime.backend if runtime is not None else "torch"
        self._model = None if model is None else _materialize(model.eval().requires_grad_(False), self.device, self.memory_format)
        # opt-in: minutes of compilation per new input shape before it pays back (bench/RESULTS.md)
        self._forward = runtime if runtime is not None else torch.compile(self.model, dynamic=False) if compile else self.model
        # the shared (3, S, S) input, or for experts that differ in preprocessing the tiled (3, H, W) one (data.preprocess)
        self.transform = config.transform()

    @classmethod
    def load(
        cls,
        weights_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 4,
        threads: int | None = None,
        preprocess: str = "default",
        bf16: bool = False,
        channels_last: bool | None = None,
        compile: bool = False,
        malloc_tuning: bool = True,
        backbones: Sequence[str] | None = None,
        backend: str = "torch",
        int8: bool = False,
        export_dir: str | os.PathLike | None = None,
    ) -> Predictor:
        """Load our format or the released ``weight.pth`` + ``ema.state`` (EMA folded once)
        from ``weights_dir`` (default: :func:`~dfd_lib.scoring.default_weights.find_weights`'s,
        ``weights/moe`` else the newest run's). ``threads`` sets torch's CPU threads.
        ``backend`` "openvino" / "onnxruntime": the cached export (``export_dir``, default
        ``weights_dir/exports``), converted first when there is none; ``int8`` (OpenVINO only) uses
        the int8 export ``dfd export --int8`` made, which changes scores."""
        weights_dir = Path(weights_dir) if weights_dir is not None else find_weights()[0]
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        if backend != "torch" or int8:
            runtime, config = load_runtime(weights_dir, backend, threads, backbones, int8, export_dir)
            predictor = cls(None, config, device or "cpu", batch_size, preprocess, bf16, channels_last, compile, runtime)
            if malloc_tuning:
                tune_malloc()
            return predictor
        model, config = load_weights(weights_dir, backbones)
        predictor = cls(model, config, device, batch_size, preprocess, bf16, channels_last, compile)
        if malloc_tuning:  # after loading, so load-time buffers are still returned to the OS
            tune_malloc()
        return predictor

    @property
    def model(self) -> MixtureOfExperts:
        """The torch mixture; with a converted backend it is loaded on first use (Grad-CAM needs it)."""
        if self._model is None:
            model = self.runtime.load_torch_model()
            self._model = _materialize(model.eval().requires_grad_(False), self.device, self.memory_format)
        return self._model

    @property
    def num_experts(self) -> int:
        return len(self.config.backbones)

    # ------------------------------------------------------------------ preprocessing

    def _decode(self, source: ImageSource) -> np.ndarray:
        """HxWx3 uint8 RGB; raises ImageLoadError with the reason."""
        return decode_rgb(source, self.preprocess)

    def to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """The model input of an HxWx3 uint8 RGB image: ``(3, S, S)``, or tiled ``(3, H, W)`` (``config.input_shape``)."""
        return self.transform(rgb)

    def load_tensor(self, source: ImageSource) -> torch.Tensor:
        return self.to_tensor(self._decode(source))

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def predict_tensor(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocessed ``(B, *config.input_shape)`` -> ``{"prob": (B,), "expert_probs": (B, E)}`` on the CPU,
        and ``"mask"`` ``(B, S, S)`` (the mixture's localisation map) when its experts have heads."""
        x = batch.to(self.device, memory_format=self.memory_format, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            out = self._forward(x)
        scores = {"prob": out["prob"].float().cpu(), "expert_probs": out["expert_probs"].float().cpu()}
        return scores | ({"mask": out["mask"].float().cpu()} if "mask" in out else {})

    @property
    def has_maps(self) -> bool:
        """Whether the mixture's experts have localisation heads (``MixtureConfig.localisation_head``)."""
        return bool(self.config.localisation_head)

    @torch.inference_mode()
    def predict_maps(self, sources: Iterable[ImageSource]) -> list[np.ndarray | None]:
        """Each source's localisation map: the mean of the experts' maps, ``(H, W)`` float32 in [0, 1] at the
        image's own resolution (1 = edited); None for an unreadable source. Needs a mixture with heads; the map
        is made in torch (a converted backend's graph has no map)."""
        self.require_maps()
        maps: list[np.ndarray | None] = []
        for source in sources:
            try:
                rgb = self._decode(source)
            except ImageLoadError:
                maps.append(None)
                continue
            maps.append(self.localise_tensor(self.to_tensor(rgb), rgb.shape[:2])[1])
        return maps

    def require_maps(self) -> None:
        """A ``ValueError`` saying why there are no maps when the mixture has no localisation heads."""
        if not self.has_maps:
            raise ValueError("this mixture has no localisation heads (trained with mask_weight 0): no maps; "
                             "Grad-CAM (dfd_lib.scoring.explain) shows what it looked at instead")

    @torch.inference_mode()
    def localise_tensor(self, tensor: torch.Tensor, size: tuple[int, int]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """One preprocessed image's scores (:meth:`predict_tensor`) and its map at ``size`` = (height, width).
        With a converted backend the scores are the backend's and the map is the torch model's."""
        self.require_maps()
        scores = self.predict_tensor(tensor[None])
        if "mask" not in scores:  # a converted backend: its graph has no map output
            x = tensor[None].to(self.device, memory_format=self.memory_format)
            scores["mask"] = self.model(x)["mask"].float().cpu()
        return scores, full_resolution(scores["mask"][0], size)

    def predict(self, sources: Iterable[ImageSource], progress: bool = False) -> list[Prediction]:
        """Score every source; unreadable ones come back with ``error`` set, never raised."""
        sources = list(sources)
        results: list[Prediction] = []
        bar = progress_bar(total=len(sources), desc="scoring", unit="img", disable=not progress)
        for start in range(0, len(sources), self.batch_size):
            chunk = sources[start : start + self.batch_size]
            preds, tensors, slots = [], [], []
            for offset, source in enumerate(chunk):
                name = describe_source(source, start + offset)
                try:
                    tensors.append(self.load_tensor(source))
                    slots.append(offset)
                    preds.append(Prediction(name, None))
                except ImageLoadError as exc:
                    preds.append(Prediction(name, None, error=exc.reason))
            if tensors:
                out = self.predict_tensor(torch.stack(tensors))
                for row, offset in enumerate(slots):
                    preds[offset].prob = float(out["prob"][row])
                    preds[offset].expert_probs = [float(p) for p in out["expert_probs"][row]]
            results.extend(preds)
            bar.update(len(chunk))
        bar.close()
        return results

    def predict_one(self, source: ImageSource) -> Prediction:
        return self.predict([source])[0]

    def predict_paths(self, paths: Iterable[str | os.PathLike], progress: bool = True) -> pd.DataFrame:
        """A table with columns path, prob_fake, prob_expert_<i>..., error (empty when scored)."""
        return predictions_frame(self.predict([str(p) for p in paths], progress=progress), self.num_experts)


def predictions_frame(predictions: Sequence[Prediction], num_experts: int) -> pd.DataFrame:
    rows = []
    for pred in predictions:
        row = {"path": pred.source, "prob_fake": pred.prob}
        for i in range(num_experts):
            row[f"prob_expert_{i}"] = pred.expert_probs[i] if pred.ok else None
        row["error"] = pred.error
        rows.append(row)
    columns = ["path", "prob_fake", *[f"prob_expert_{i}" for i in range(num_experts)], "error"]
    return pd.DataFrame(rows, columns=columns)
