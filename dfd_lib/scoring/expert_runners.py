"""One expert's forward pass as fast as this machine allows while its scores stay those of the
plain torch expert (within 1e-5, tests/test_expert_scores.py): the engines behind
:mod:`dfd_lib.scoring.expert_scores`.

- **torch**: a copy of the expert with every batch norm folded into the convolution before it
  (scale and shift moved into the convolution's weights and bias; the activation stays),
  channels_last memory, ``torch.inference_mode`` and batches. The fold moves probabilities by a
  few 1e-6 at most (rounding of the folded weights; OpenVINO's own fusions move them as much) and
  saves the batch-norm pass, about a third of the forward time of tf_efficientnet_lite0 at 128 px
  in channels_last on the development CPU (bench/RESULTS.md, "Notebook 04's evaluation").
- **openvino** (when installed): the expert converted once (fp32, as :mod:`dfd_lib.scoring.export`
  converts a mixture) and cached under the user's cache folder, keyed by a digest of the expert's
  tensors, its input size and the runtime's and torch's versions, so a reused export provably comes
  from the same weights; compiled for a fixed batch (and once more for a last, shorter batch's size), the
  compiled model cached beside the export. Converting costs seconds per expert, so an
  expert is converted only when it has many images to score or its export is cached already
  (:func:`dfd_lib.scoring.expert_scores.choose_engine`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfd_lib.core.signal_stack import reinstall_signal_stack, release_openvino
from dfd_lib.models.experts import FAKE_CLASS, Expert
from dfd_lib.scoring.backends import openvino_ir, require, runtime_version

EXPORT_VERSION = 1
OPENVINO_BATCH = 16  # static batch of the compiled expert: the fastest of 1 / 16 / 64 measured here
EXPORTS_KEPT = 48  # expert exports kept in the cache folder, the most recently used first


class _Activation(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once its normalisation is folded: dropout, activation."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_norm_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, str, nn.BatchNorm2d]]:
    """Each batch norm that directly follows a convolution in module order (timm's conv-bn-act
    layout), with the convolution; a norm whose channels differ from the convolution's outputs is left."""
    pairs, previous = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            previous = module
        elif isinstance(module, nn.BatchNorm2d):
            if previous is not None and previous.out_channels == module.num_features and module.track_running_stats:
                pairs.append((previous, name, module))
            previous = None
    return pairs


def fold_batchnorm(expert: Expert) -> Expert:
    """A copy of ``expert`` (in eval mode) with each batch norm folded into the convolution before it."""
    model = copy.deepcopy(expert).eval().requires_grad_(False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv, name, norm in _conv_norm_pairs(model):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(shift, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, _Activation(norm))
    return model


def fake_probs(logits: torch.Tensor) -> np.ndarray:
    """Class-1 softmax probabilities as :class:`~dfd_lib.models.experts.MixtureOfExperts` computes them."""
    return logits.float().softmax(dim=-1)[:, FAKE_CLASS].numpy()


class TorchRunner:
    """``runner(batch)`` -> fake probabilities of the folded, channels_last expert."""

    backend = "torch"

    def __init__(self, expert: Expert):
        self.model = fold_batchnorm(expert).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return fake_probs(self.model(batch.contiguous(memory_format=torch.channels_last))["logits"])


class _Logits(nn.Module):
    def __init__(self, expert: Expert):
        super().__init__()
        self.expert = expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(x)["logits"]


def export_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dfd-kit" / "expert-exports"


def export_folder(digest: str, image_size: int, root: Path | None = None) -> Path:
    """Where the OpenVINO export of the expert with tensor ``digest`` at ``image_size`` lives."""
    identity = {"expert_sha256": digest, "image_size": int(image_size), "export_version": EXPORT_VERSION,
                "runtime": runtime_version("openvino"), "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return (root or export_root()) / key


def has_export(digest: str, image_size: int) -> bool:
    return (export_folder(digest, image_size) / "model.xml").is_file()


def convert_expert(expert: Expert, image_size: int, folder: Path) -> Path:
    """The fp32 OpenVINO IR of ``expert``'s logits, written to ``folder`` whole or not at all."""
    ov = require("openvino", "openvino")
    folder.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, image_size, image_size)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder.parent) as tmp:
        converted = openvino_ir(_Logits(copy.deepcopy(expert)), example)
        ov.save_model(converted, str(Path(tmp) / "model.xml"), compress_to_fp16=False)  # fp16 would move scores
        if folder.exists() and not (folder / "model.xml").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a leftover without its model (e.g. only OpenVINO's compile cache)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote this export meanwhile: the same key, the same weights; keep theirs
            if not (folder / "model.xml").is_file():
                raise
        else:
            Path(tmp).mkdir()  # TemporaryDirectory removes its (now moved) folder on exit
    _prune(folder.parent)
    return folder / "model.xml"


def _prune(root: Path) -> None:
    folders = sorted((f for f in root.iterdir() if f.is_dir() and not f.name.startswith(".")),
                     key=lambda f: f.stat().st_mtime, reverse=True)
    for stale in folders[EXPORTS_KEPT:]:
        shutil.rmtree(stale, ignore_errors=True)


class OpenVINORunner:
    """``runner(batch)`` -> fake probabilities from the expert's cached OpenVINO export (fp32)."""

    backend = "openvino"

    def __init__(self, expert: Expert, digest: str, image_size: int, threads: int | None = None):
        ov = require("openvino", "openvino")
        folder = export_folder(digest, image_size)
        model_file = folder / "model.xml"
        if not model_file.is_file():
            convert_expert(expert, image_size, folder)
        os.utime(folder)  # most recently used: kept longest
        self.core, self.folder, self.threads, self.image_size = ov.Core(), folder, threads, image_size
        self.model = self.core.read_model(str(model_file))
        self.requests: dict[int, object] = {}
        self._request(OPENVINO_BATCH)

    def _request(self, batch: int):
        """The expert compiled for a static ``batch`` (one per size asked: the full batch, and a last batch's size)."""
        if batch not in self.requests:
            self.model.reshape({self.model.input(0): [batch, 3, self.image_size, self.image_size]})
            # CACHE_DIR: OpenVINO keeps the compiled model beside the export; compiling again takes 0.1 s instead of 0.6
            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(self.folder / "compiled")}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = int(self.threads)
            self.requests[batch] = self.core.compile_model(self.model, "CPU", config).create_infer_request()
            reinstall_signal_stack()  # OpenVINO swapped it (dfd_lib/core/signal_stack.py)
        return self.requests[batch]

    def __del__(self):
        release_openvino(self, "requests", "model")

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        probs = []
        for start in range(0, len(x), OPENVINO_BATCH):
            chunk = x[start : start + OPENVINO_BATCH]
            request = self._request(len(chunk))  # a last, shorter batch at its own size: nothing computed for padding
            request.infer({0: chunk})
            logits = torch.from_numpy(request.get_output_tensor(0).data.copy())
            probs.append(fake_probs(logits))
        return np.concatenate(probs)


def openvino_installed() -> bool:
    try:
        require("openvino", "openvino")
    except ImportError:
        return False
    return True
