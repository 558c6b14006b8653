"""Runtimes other than torch for the mixture's forward pass on CPUs: OpenVINO and ONNX Runtime.

A runtime replaces one thing only, the forward pass: a preprocessed ``(B, 3, S, S)`` batch ->
``{"prob": (B,), "expert_probs": (B, E)}``. Decoding, faces, batching and errors stay the
:class:`~dfd_lib.scoring.predictor.Predictor`'s code. The converted model comes from
:mod:`dfd_lib.scoring.export` (cached beside the weights); both runtimes compute in fp32
(OpenVINO is told ``INFERENCE_PRECISION_HINT=f32``: its CPU plugin would otherwise pick bf16 on
CPUs that have it), so scores match torch within 1e-5 (tests/test_backends.py, bench/RESULTS.md).
An int8 export (:mod:`dfd_lib.scoring.quantize`) runs through the same OpenVINO runtime.

OpenVINO is installed with the kit; ONNX Runtime and the int8 quantiser (nncf) are the optional extra
``openvino``: ``pip install -e .[openvino]``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dfd_lib.core.signal_stack import reinstall_signal_stack, release_openvino

BACKENDS = ("torch", "openvino", "onnxruntime")
EXPORT_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx"}  # backend -> the export it runs
PACKAGES = {"openvino": ("openvino",), "onnx": ("onnx", "onnxruntime"), "onnxruntime": ("onnxruntime",),
            "int8": ("openvino", "nncf")}
OUTPUT_NAMES = ("prob", "expert_probs")


class BackendUnavailable(ImportError):
    """A backend's packages are not installed; the message says how to get them."""


def require(what: str, module: str) -> object:
    """Import ``module`` for ``what`` (a backend, an export format or ``int8``), or say which
    packages to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        needed = " and ".join(PACKAGES.get(what, (module,)))
        raise BackendUnavailable(
            f"the {what} backend needs {needed}, which {'are' if ' and ' in needed else 'is'} not installed "
            f"({exc.name or module} missing): pip install -e .[openvino]  (or: pip install {' '.join(PACKAGES.get(what, (module,)))})"
        ) from None


def openvino_ir(module: torch.nn.Module, example: torch.Tensor, **convert_options):
    """``module`` converted by OpenVINO, traced by torch first (several times faster than letting convert_model
    trace). The deprecation torch now prints for ``torch.jit.trace`` is silenced here: the trace is OpenVINO's
    documented input, and the line reached the terminal at every conversion."""
    ov = require("openvino", "openvino")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        return ov.convert_model(traced, example_input=example, **convert_options)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def add_backend_arguments(parser) -> None:
    """``--backend`` and ``--int8``, shared by ``dfd predict`` and ``dfd serve``."""
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="runtime of the forward pass: openvino / onnxruntime run a converted model, cached beside the "
                             "weights (converted on first use, about a minute at full size), same scores within 1e-5, "
                             "faster on CPUs; needs pip install -e .[openvino] (default: torch)")
    parser.add_argument("--int8", action="store_true",
                        help="with --backend openvino: the int8 model `dfd export --int8` made; faster, but changes scores")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="with --backend openvino/onnxruntime: the folder `dfd export --out` wrote the exports to "
                             "(default: WEIGHTS_DIR/exports, or ~/.cache/dfd-kit/exports beside read-only weights)")


def runtime_version(fmt: str) -> str:
    """The version of the runtime an export of format ``fmt`` is built for (part of its cache key)."""
    if fmt == "openvino":
        return "openvino " + require("openvino", "openvino").get_version()
    return "onnxruntime " + require("onnx", "onnxruntime").__version__


class ConvertedMixture:
    """A converted mixture, called like the torch one: ``runtime(x)`` -> ``{"prob", "expert_probs"}``
    as CPU float tensors. ``load_torch_model`` gives the torch mixture when something needs it
    (Grad-CAM); scoring never does."""

    backend = ""

    def __init__(self, path: Path, load_torch_model: Callable[[], torch.nn.Module] | None = None):
        self.path = Path(path)
        self.load_torch_model = load_torch_model

    def run(self, x: np.ndarray) -> Sequence[np.ndarray]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        prob, expert_probs = self.run(batch)
        return {"prob": torch.from_numpy(np.array(prob, dtype=np.float32)),
                "expert_probs": torch.from_numpy(np.array(expert_probs, dtype=np.float32))}


class OpenVINOMixture(ConvertedMixture):
    """An OpenVINO IR (``model.xml`` + ``model.bin``) compiled for the CPU in fp32, for one image
    at a time: with a static shape OpenVINO plans and reuses its activation buffers (the dynamic
    batch of the export made the 7-expert mixture at 512 px peak at 2.6 GB instead of 2.45 GB,
    bench/RESULTS.md), and an image's score never depends on what it was batched with."""

    backend = "openvino"

    def __init__(self, path: Path, threads: int | None = None, load_torch_model=None):
        super().__init__(path, load_torch_model)
        ov = require("openvino", "openvino")
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        model = core.read_model(str(self.path))
        shape = model.input(0).get_partial_shape()
        shape[0] = 1
        model.reshape({model.input(0): shape})
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()  # one model thread calls it (Predictor, server worker)
        reinstall_signal_stack()  # OpenVINO swapped it (dfd_lib/core/signal_stack.py)

    def __del__(self):
        release_openvino(self, "request", "compiled")

    def run(self, x: np.ndarray) -> Sequence[np.ndarray]:
        outputs: list[list[np.ndarray]] = [[] for _ in OUTPUT_NAMES]
        for row in range(len(x)):
            self.request.infer({0: x[row : row + 1]})
            for i, collected in enumerate(outputs):
                collected.append(self.request.get_output_tensor(i).data.copy())
        return [np.concatenate(collected) for collected in outputs]


class OnnxRuntimeMixture(ConvertedMixture):
    """An ONNX file run by ONNX Runtime's CPU provider (fp32)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, load_torch_model=None):
        super().__init__(path, load_torch_model)
        ort = require("onnxruntime", "onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> Sequence[np.ndarray]:
        return self.session.run(list(OUTPUT_NAMES), {self.input_name: x})


RUNTIMES: dict[str, type[ConvertedMixture]] = {"openvino": OpenVINOMixture, "onnxruntime": OnnxRuntimeMixture}


def open_runtime(backend: str, model_file: str | os.PathLike, threads: int | None = None,
                 load_torch_model: Callable[[], torch.nn.Module] | None = None) -> ConvertedMixture:
    """The converted model file ``model_file`` ready to score with ``backend``."""
    if check_backend(backend) == "torch":
        raise ValueError("the torch backend runs the torch mixture itself; nothing to open")
    return RUNTIMES[backend](Path(model_file), threads, load_torch_model)
