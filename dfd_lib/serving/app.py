"""The HTTP API and the web page of ``dfd serve`` (:mod:`dfd_lib.serving.cli` runs it on uvicorn).

The original release's contract holds byte for byte: ``POST /predict`` with JSON
``{"image": "<base64>"}`` answers ``200`` with ``{"result":<fake probability>}`` plus a
newline, ``Content-Type: application/json`` — exactly what Flask's ``jsonify`` sends, so a
client written for the original server works unchanged. Around it: a batch endpoint,
heatmaps (``POST /explain``: Grad-CAM, or with ``?map=localisation`` / ``auto`` the localisation heads'
map of a mixture that has them, :mod:`dfd_lib.serving.heatmaps`), ``GET /health`` (with ``demo_weights`` and a ``notice`` for a
mixture trained on the built-in demo, which the page shows as a banner), the OpenAPI schema (``/openapi.json``,
``/docs``), limits on body size and pixel count, an optional bearer token, and a
``{"error": "<message>"}`` JSON answer with a 4xx status for every bad request.

The model is loaded once; one thread owns it (:mod:`dfd_lib.serving.worker`), so concurrent
requests share it safely and are batched, while decoding runs in the server's thread pool
and the event loop never waits on torch. See ``docs/serving.md``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dfd_lib.data.images import ImageLoadError
from dfd_lib.models.demo_weights import demo_notice
from dfd_lib.scoring.calibration import VerdictThreshold, resolve_threshold
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.face_requests import FaceServing, face_fields, score_faces
from dfd_lib.serving.heatmaps import MAP_QUERY, explain_faces, explain_whole, heatmap_kind, heatmap_kinds
from dfd_lib.serving.request_parsing import ApiError, ImageLimits, prefix, read_image_bytes, read_image_list, vet_image
from dfd_lib.serving.schema import (
    ERRORS,
    BatchResponse,
    CompactJSONResponse,
    ExplainResponse,
    PredictResponse,
    error_response,
    image_body,
)
from dfd_lib.serving.worker import DEFAULT_MAX_QUEUE, ModelWorker, QueueFull

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BODY_MB = 20.0
DEFAULT_MAX_PIXELS = 25_000_000  # 5000x5000; a decoded image costs 3 bytes/pixel, its float tensor 12
DEFAULT_MIN_SIDE = 16  # smaller images carry no evidence a 512 px model can use
DEFAULT_MAX_BATCH_IMAGES = 32

log = logging.getLogger(__name__)
router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="needed only when the server was started with --token")


@dataclass
class Served:
    """What the routes share, kept in ``app.state.served``."""

    predictor: Predictor
    worker: ModelWorker
    limits: ImageLimits
    token: str | None
    max_body_bytes: int
    max_batch_images: int
    verdicts: VerdictThreshold  # the threshold of every verdict, and where it came from
    faces: FaceServing = field(default_factory=FaceServing)  # face-centred crops (?faces=true)
    notice: str | None = None  # demo weights say so (dfd_lib.models.demo_weights): /health and the page show it


# --------------------------------------------------------------------------- limits


class BodyLimitMiddleware:
    """Refuses bodies over ``max_body_bytes`` with a JSON error: from ``Content-Length``
    before reading a byte, and by counting streamed (chunked) bytes as they arrive.
    (FastAPI's own ``max_body_size`` answers a declared oversize body in plain text.)"""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self, size: str) -> str:
        return f"request body {size} exceeds the limit of {self.max_body_bytes:,} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await error_response(400, "invalid Content-Length header")(scope, receive, send)
            digits = declared.strip().lstrip(b"0") or b"0"
            if len(digits) > 18 or int(digits) > self.max_body_bytes:  # 19 digits and more: past any limit (and int()'s)
                size = f"of {int(digits):,} bytes" if len(digits) <= 18 else f"with a {len(digits):,}-digit length"
                return await error_response(413, self._too_large(size))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise ApiError(413, self._too_large(f"(over {received:,} bytes so far)"))
            return message

        await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------- the app


def create_app(
    predictor_or_weights_dir: Predictor | str | os.PathLike,
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    token: str | None = None,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
    strict_modes: bool = False,
    model_batch: int | None = None,
    threshold: float | None = None,
    faces: FaceServing | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> FastAPI:
    """The API and the page around a loaded :class:`Predictor` (or the weights folder to
    load one from). ``token``: when set, every POST needs ``Authorization: Bearer <token>``.
    ``model_batch``: most images per forward pass (default: the predictor's batch size).
    ``threshold``: the verdicts' threshold (default: the mixture's calibrated one, else 0.5).
    ``faces``: face-crop settings (default: off unless a request asks, at most 8 faces).
    ``max_queue``: most images waiting for the model; past it requests get 503 with Retry-After."""
    predictor = (predictor_or_weights_dir if isinstance(predictor_or_weights_dir, Predictor)
                 else Predictor.load(predictor_or_weights_dir))
    if max_body_bytes < 1024:
        raise ValueError(f"max_body_bytes must be at least 1024, got {max_body_bytes}")
    if max_batch_images < 1:
        raise ValueError(f"max_batch_images must be >= 1, got {max_batch_images}")
    if token is not None and not token.strip():
        raise ValueError("the bearer token must not be empty (leave it unset to serve without one)")
    served = Served(predictor, ModelWorker(predictor, model_batch, max_queue), ImageLimits(max_pixels, min_side, strict_modes),
                    token, max_body_bytes, max_batch_images, resolve_threshold(predictor.config, threshold),
                    faces or FaceServing(), demo_notice(predictor.config))
    if served.notice:
        log.warning("dfd serve: %s", served.notice)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        served.worker.close()

    app = FastAPI(
        title="dfd-kit deepfake detection API",
        version="1",
        description="Scores images with a mixture of experts: the fake probability, each expert's, "
                    "and a heatmap: Grad-CAM, or (`POST /explain?map=localisation`, a mixture trained with "
                    "localisation heads) where it predicts the image was edited. `POST /predict` keeps the "
                    "original release's contract.",
        default_response_class=CompactJSONResponse,
        lifespan=lifespan,
    )
    app.state.served = served
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    _add_error_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers ``{"error": "<message>"}`` with its status."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, ApiError):
            message = exc.detail
        elif exc.status_code == 404:
            message = f"no such endpoint: {prefix(request.method)} {prefix(request.url.path)}"
        elif exc.status_code == 405:
            message = f"method {prefix(request.method)} is not allowed on {prefix(request.url.path)}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in exc.errors()]
        return error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(QueueFull)
    async def _busy(_request: Request, exc: QueueFull):
        return error_response(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception):
        log.exception("request failed")
        return error_response(500, f"internal server error ({type(exc).__name__})")


# --------------------------------------------------------------------------- helpers


def _served(request: Request) -> Served:
    return request.app.state.served


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    token = _served(request).token
    if token is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "missing bearer token: send the header 'Authorization: Bearer <token>'", challenge)
    if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise ApiError(401, "invalid bearer token", challenge)


def _prepare(served: Served, data: bytes):
    """Vet, decode and preprocess one image (thread pool): ``(rgb, tensor)``."""
    rgb = vet_image(data, served.limits)
    source = data if served.predictor.preprocess == "compat" else rgb  # compat decodes bytes with OpenCV
    try:
        return rgb, served.predictor.load_tensor(source)
    except ImageLoadError as exc:
        raise ApiError(422, exc.reason) from None


async def _prepare_item(served: Served, item):
    if isinstance(item, ApiError):
        return item
    try:
        return await run_in_threadpool(_prepare, served, item)
    except ApiError as exc:
        return exc


FACES_QUERY = Query(None, description="score face-centred crops: each face found, the image's score by the "
                                       "server's rule (default: the server's --faces setting)")


async def _batch_with_faces(served: Served, items: list) -> dict:
    async def one(item):
        if isinstance(item, ApiError):
            return item
        try:
            return await score_faces(served, item)
        except ApiError as exc:
            return exc

    results: list[dict] = []
    for i, outcome in enumerate(await asyncio.gather(*[one(item) for item in items])):
        if isinstance(outcome, ApiError):
            results.append({"index": i, "error": outcome.detail, "status": outcome.status_code})
        else:
            scores = outcome[1]
            results.append({"index": i, "result": scores.prob, "experts": scores.expert_probs,
                            "verdict": served.verdicts.verdict(scores.prob), **face_fields(scores)})
    return {"results": results, "count": len(results), "errors": sum("error" in r for r in results),
            "threshold": served.verdicts.value, "threshold_source": served.verdicts.source}


# --------------------------------------------------------------------------- routes


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/health", summary="Liveness and what the server runs")
async def health(request: Request) -> dict:
    served = _served(request)
    predictor, worker, limits = served.predictor, served.worker, served.limits
    return {
        "status": "ok",
        "model": {"backbones": predictor.config.backbones, "experts": predictor.num_experts,
                  "image_size": predictor.config.image_size, "expert_image_sizes": predictor.config.expert_sizes,
                  "preprocess": predictor.preprocess,
                  "device": str(predictor.device), "localisation_head": predictor.config.localisation_head or None},
        "heatmaps": heatmap_kinds(predictor),
        "limits": {"max_body_bytes": served.max_body_bytes, "max_pixels": limits.max_pixels,
                   "min_side": limits.min_side, "max_batch_images": served.max_batch_images,
                   "strict_modes": limits.strict_modes},
        "token_required": served.token is not None,
        "demo_weights": served.notice is not None,
        "notice": served.notice,
        "threshold": served.verdicts.info(),
        "faces": served.faces.info(),
        "queue": {"queued": worker.queued, "max_queue": worker.max_queue, "refused": worker.stats.refused},
        "served": {"images": worker.stats.images, "batches": worker.stats.batches,
                   "mean_batch": round(worker.stats.mean_batch, 3), "explanations": worker.stats.calls},
    }


@router.post("/predict", summary="Fake probability of one image (the original contract)",
             response_model=None, responses={200: {"model": PredictResponse}, **ERRORS},
             openapi_extra=image_body("image", many=False), dependencies=[Depends(require_token)])
async def predict(request: Request, details: bool = Query(False, description="add each expert's probability"),
                  faces: bool | None = FACES_QUERY):
    served = _served(request)
    if served.faces.wanted(faces):
        _prepared, scores = await score_faces(served, await read_image_bytes(request, served.max_body_bytes))
        details_fields = {"experts": scores.expert_probs, **served.verdicts.fields(scores.prob)} if details else {}
        return CompactJSONResponse({"result": scores.prob, **details_fields, **face_fields(scores)})
    _rgb, tensor = await run_in_threadpool(_prepare, served, await read_image_bytes(request, served.max_body_bytes))
    [(prob, experts)] = await served.worker.score([tensor])
    details_fields = {"experts": experts, **served.verdicts.fields(prob)} if details else {}
    return CompactJSONResponse({"result": prob, **details_fields})


@router.post("/predict/batch", summary="Fake probabilities of several images",
             response_model=None, responses={200: {"model": BatchResponse}, **ERRORS},
             openapi_extra=image_body("images", many=True), dependencies=[Depends(require_token)])
async def predict_batch(request: Request, faces: bool | None = FACES_QUERY):
    served = _served(request)
    items = await read_image_list(request, served.max_body_bytes, served.max_batch_images)
    if served.faces.wanted(faces):
        return CompactJSONResponse(await _batch_with_faces(served, items))
    results: list[dict] = [{"index": i} for i in range(len(items))]
    prepared = await asyncio.gather(*[_prepare_item(served, item) for item in items])  # decoded in parallel
    ready: list[tuple[int, Any]] = []
    for i, outcome in enumerate(prepared):
        if isinstance(outcome, ApiError):
            results[i].update(error=outcome.detail, status=outcome.status_code)
        else:
            ready.append((i, outcome[1]))
    scores = await served.worker.score([tensor for _, tensor in ready]) if ready else []
    for (i, _), (prob, experts) in zip(ready, scores):
        results[i].update(result=prob, experts=experts, verdict=served.verdicts.verdict(prob))
    errors = sum("error" in r for r in results)
    return CompactJSONResponse({"results": results, "count": len(results), "errors": errors,
                                "threshold": served.verdicts.value, "threshold_source": served.verdicts.source})


@router.post("/explain", summary="Scores and a heatmap of one image: Grad-CAM, or the localisation heads' map",
             response_model=None, responses={200: {"model": ExplainResponse}, **ERRORS},
             openapi_extra=image_body("image", many=False), dependencies=[Depends(require_token)])
async def explain_image(request: Request,
                        expert: int | None = Query(None, ge=0, description="one expert's Grad-CAM (default: the mixture's)"),
                        faces: bool | None = FACES_QUERY, map: str = MAP_QUERY):  # noqa: A002 (the query parameter's name)
    served = _served(request)
    predictor = served.predictor
    if expert is not None and expert >= predictor.num_experts:
        raise ApiError(400, f"expert {prefix(str(expert))} does not exist: the mixture has experts 0..{predictor.num_experts - 1}")
    kind = heatmap_kind(predictor, map, expert)
    experts = None if expert is None else [expert]
    data = await read_image_bytes(request, served.max_body_bytes)
    if served.faces.wanted(faces):
        return CompactJSONResponse(await explain_faces(served, data, experts, kind))
    rgb, tensor = await run_in_threadpool(_prepare, served, data)
    return CompactJSONResponse(await explain_whole(served, rgb, tensor, experts, kind))
