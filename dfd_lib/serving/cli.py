"""``dfd serve``: the HTTP API and the web page (:mod:`dfd_lib.serving.app`) on uvicorn, a
production ASGI server; ``--workers N`` runs N processes, each with its own copy of the model."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from dfd_lib.core.cpus import available_cores
from dfd_lib.models.checkpoints import PREPROCESS_MODES, CheckpointError
from dfd_lib.scoring.backends import EXPORT_FORMAT, BackendUnavailable, add_backend_arguments
from dfd_lib.scoring.default_weights import DEFAULT_WEIGHTS_DIR, WeightsNotFound, find_weights
from dfd_lib.scoring.export import ensure_export
from dfd_lib.scoring.faces import FaceOptions, add_face_arguments
from dfd_lib.scoring.predictor import Predictor, cap_malloc_arenas
from dfd_lib.serving.app import DEFAULT_MAX_BATCH_IMAGES, DEFAULT_MAX_BODY_MB, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, create_app
from dfd_lib.serving.face_requests import DEFAULT_MAX_FACES, FaceServing
from dfd_lib.serving.request_parsing import ImageLimits
from dfd_lib.serving.worker import DEFAULT_MAX_QUEUE

TOKEN_ENV = "DFD_SERVE_TOKEN"
SETTINGS_ENV = "DFD_SERVE_SETTINGS"  # hands the settings to each process when --workers > 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``dfd serve`` needs to build the app (also passed to worker processes)."""

    weights: str = str(DEFAULT_WEIGHTS_DIR)
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES
    strict_modes: bool = False
    batch_size: int = 8
    threads: int | None = None
    device: str | None = None
    preprocess: str = "default"
    threshold: float | None = None  # the verdicts' threshold; None: the mixture's calibrated one, else 0.5
    faces: bool = False  # face-centred crops for requests that do not say (?faces=)
    face_rule: str = FaceOptions.rule
    face_margin: float = FaceOptions.margin
    min_face: int = FaceOptions.min_face
    max_faces: int = DEFAULT_MAX_FACES  # more faces in one image: 422
    max_queue: int = DEFAULT_MAX_QUEUE  # more images waiting for the model: 503 with Retry-After
    backend: str = "torch"  # the forward pass's runtime: torch, openvino, onnxruntime (dfd_lib.scoring.backends)
    int8: bool = False  # openvino only: the int8 export (changes scores)
    export_dir: str | None = None  # where the exports are (dfd export --out); None: beside the weights

    def __post_init__(self):
        if self.max_body_bytes < 1024:
            raise ValueError(f"the body limit must be at least 1 KiB, got {self.max_body_bytes} bytes")
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be >= 1, got {self.max_batch_images}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")
        ImageLimits(self.max_pixels, self.min_side, self.strict_modes)  # validates those two
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {self.threshold}")
        self.face_serving()  # validates the face settings
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {self.max_queue}")

    def face_serving(self) -> FaceServing:
        return FaceServing(self.faces, FaceOptions(margin=self.face_margin, rule=self.face_rule, min_face=self.min_face),
                           self.max_faces)


def app_from_settings(settings: ServeSettings, token: str | None = None) -> FastAPI:
    cap_malloc_arenas()  # before the model and the threads allocate
    predictor = Predictor.load(settings.weights, device=settings.device, batch_size=settings.batch_size,
                               threads=settings.threads, preprocess=settings.preprocess, backend=settings.backend,
                               int8=settings.int8, export_dir=settings.export_dir)
    return create_app(predictor, settings.max_body_bytes, settings.max_pixels, token,
                      min_side=settings.min_side, max_batch_images=settings.max_batch_images,
                      strict_modes=settings.strict_modes, threshold=settings.threshold,
                      faces=settings.face_serving(), max_queue=settings.max_queue)


def app_from_environment() -> FastAPI:
    """The factory uvicorn calls in each worker process (``--workers N``)."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    return app_from_settings(settings, os.environ.get(TOKEN_ENV) or None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint folder: ours or the released weight.pth + ema.state "
                             "(default: weights/moe, else the most recent run's under reports/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' on every POST (or set ${TOKEN_ENV}, kept out of `ps`)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help=f"largest request body in MiB (default: {DEFAULT_MAX_BODY_MB:g})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"largest image in pixels, checked from the header before decoding (default: {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE,
                        help=f"smallest accepted image side in pixels (default: {DEFAULT_MIN_SIDE})")
    parser.add_argument("--max-batch-images", type=int, default=DEFAULT_MAX_BATCH_IMAGES,
                        help=f"most images in one /predict/batch request (default: {DEFAULT_MAX_BATCH_IMAGES})")
    parser.add_argument("--strict-modes", action="store_true",
                        help="refuse images that are not 8-bit RGB or greyscale (CMYK, 16-bit, alpha) instead of converting them")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes, each with its own copy of the model (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: cores / workers)")
    parser.add_argument("--batch-size", type=int, default=8, help="most images per forward pass (default: 8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="default",
                        help="'compat' decodes with OpenCV exactly like the original release (default: default)")
    add_backend_arguments(parser)
    parser.add_argument("--threshold", type=float, default=None,
                        help="verdict threshold, fake if the probability is at least it (default: the mixture's from "
                             "`dfd calibrate`, else 0.5, 'not calibrated')")
    parser.add_argument("--faces", action="store_true",
                        help="score face-centred crops unless a request says ?faces=false (default: only when asked)")
    add_face_arguments(parser)
    parser.add_argument("--max-faces", type=int, default=DEFAULT_MAX_FACES,
                        help=f"most faces scored in one image; more: 422 (default: {DEFAULT_MAX_FACES})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"most images waiting for the model; more: 503 with Retry-After (default: {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    threads = args.threads or max(1, available_cores() // args.workers)
    return ServeSettings(weights=str(args.weights), max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         max_pixels=args.max_pixels, min_side=args.min_side, max_batch_images=args.max_batch_images,
                         strict_modes=args.strict_modes, batch_size=args.batch_size, threads=threads,
                         device=args.device, preprocess=args.preprocess, threshold=args.threshold,
                         faces=args.faces, face_rule=args.face_rule, face_margin=args.face_margin, min_face=args.min_face,
                         max_faces=args.max_faces, max_queue=args.max_queue, backend=args.backend, int8=args.int8,
                         export_dir=str(args.export_dir) if args.export_dir is not None else None)


def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.token:
        log.warning("dfd serve: a token given with --token is visible to every user of this machine (`ps`); "
                    "set $%s instead", TOKEN_ENV)
    try:
        explicit = args.weights is not None
        args.weights, why = find_weights(args.weights)
        settings = settings_from_args(args)
    except (ValueError, WeightsNotFound) as exc:
        log.error("dfd serve: %s", exc)
        return 2
    if not Path(settings.weights).is_dir():
        log.error("dfd serve: weights folder %s not found; train one (notebook 04), convert the released weights "
                  "with `dfd convert-weights SRC %s`, or pass --weights DIR", settings.weights, DEFAULT_WEIGHTS_DIR)
        return 2
    if not explicit:
        log.info("dfd serve: weights %s", why)
    if not is_loopback(args.host) and token is None:
        log.warning("dfd serve: listening on %s without --token: anyone who can reach this address can use the model",
                    args.host)
    common = dict(host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    if args.workers == 1:
        try:
            app = app_from_settings(settings, token)
        except (BackendUnavailable, CheckpointError, ValueError) as exc:
            log.error("dfd serve: %s", exc)
            return 2
        log.info("dfd serve: %d experts loaded from %s; page and API on http://%s:%d/ (schema: /docs)",
                 app.state.served.predictor.num_experts, settings.weights, args.host, args.port)
        log.info("dfd serve: verdicts at threshold %.4f (%s)", app.state.served.verdicts.value, app.state.served.verdicts.note)
        uvicorn.run(app, **common)
    else:  # each process loads the model itself; the settings travel in the environment
        if settings.backend != "torch" and not settings.int8:  # converted once here, not by every worker at once
            try:
                ensure_export(settings.weights, EXPORT_FORMAT[settings.backend], settings.export_dir)
            except (BackendUnavailable, CheckpointError, ValueError) as exc:
                log.error("dfd serve: %s", exc)
                return 2
        os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
        if token is not None:
            os.environ[TOKEN_ENV] = token
        uvicorn.run("dfd_lib.serving.cli:app_from_environment", factory=True, workers=args.workers, **common)
    return 0
