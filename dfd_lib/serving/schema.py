"""What the API answers, as FastAPI and its OpenAPI schema see it: the compact JSON the original
release's Flask server wrote, the response models, and the request bodies the endpoints read by hand."""
from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dfd_lib.serving.request_parsing import MAX_ERROR_CHARS, prefix


class CompactJSONResponse(JSONResponse):
    """JSON as Flask's ``jsonify`` writes it outside debug mode: sorted keys, no spaces,
    ASCII only, a trailing newline, ``Content-Type: application/json``."""

    def render(self, content: Any) -> bytes:
        return (json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> CompactJSONResponse:
    return CompactJSONResponse({"error": prefix(message, MAX_ERROR_CHARS)}, status_code=status, headers=headers)


VERDICT = Field(None, description="fake if the probability is at least the threshold, else real")
THRESHOLD = Field(None, description="the verdicts' threshold")
THRESHOLD_SOURCE = Field(None, description="calibrated (dfd calibrate), given (--threshold) or not calibrated (0.5); "
                                           "'; demo weights' follows for a mixture trained on the built-in demo")


class PredictResponse(BaseModel):
    result: float = Field(description="the mixture's fake probability in [0, 1]")
    experts: list[float] | None = Field(None, description="each expert's fake probability (with ?details=true)")
    verdict: str | None = VERDICT
    threshold: float | None = THRESHOLD
    threshold_source: str | None = THRESHOLD_SOURCE


class BatchItem(BaseModel):
    index: int
    result: float | None = None
    experts: list[float] | None = None
    verdict: str | None = VERDICT
    error: str | None = Field(None, description="why this image could not be scored")
    status: int | None = Field(None, description="the HTTP status this error would have on its own")


class BatchResponse(BaseModel):
    results: list[BatchItem]
    count: int
    errors: int
    threshold: float | None = THRESHOLD
    threshold_source: str | None = THRESHOLD_SOURCE


class ExplainResponse(BaseModel):
    result: float
    experts: list[float]
    backbones: list[str]
    heatmap: str = Field(description="PNG data URL: the heatmap over the image (or the deciding face's crop)")
    heatmap_kind: str = Field(description="grad-cam (what the experts looked at) or localisation (the mixture's "
                                          "localisation heads' map: where it predicts an edit)")
    map: str | None = Field(None, description="with heatmap_kind localisation: the raw map, a PNG data URL, 8-bit "
                                              "greyscale at the scored image's resolution, 255 = edited")
    verdict: str | None = VERDICT
    threshold: float | None = THRESHOLD
    threshold_source: str | None = THRESHOLD_SOURCE


class ErrorResponse(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422)}


# A 16x16 PNG (the smallest side the server accepts by default): the schema's example, which
# Swagger UI's "Try it out" sends and the API fuzzing test starts from (tests/test_api_fuzz.py).
EXAMPLE_IMAGE = ("iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAH0lEQVR42mNkYGAQYOAgHrEwCHAwMJCARjWMahg6GgC3uAoWNmq"
                 "+CwAAAABJRU5ErkJggg==")


def image_body(field: str, many: bool) -> dict:
    """OpenAPI request body: the JSON and multipart forms the endpoint reads by hand."""
    string = {"type": "string", "format": "byte", "description": "base64 (or a data:image/...;base64, URL)"}
    binary = {"type": "string", "format": "binary"}
    json_schema = {"type": "array", "items": string} if many else string
    form_schema = {"type": "array", "items": binary} if many else binary
    example = {field: [EXAMPLE_IMAGE, EXAMPLE_IMAGE] if many else EXAMPLE_IMAGE}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": [field], "properties": {field: json_schema}},
                             "example": example},
        "multipart/form-data": {"schema": {"type": "object", "required": [field], "properties": {field: form_schema}}},
    }}}
