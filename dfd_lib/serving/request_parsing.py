"""Reading images out of HTTP requests, with a clear error for every way a request can be wrong.

Accepted bodies (``POST /predict``, ``/explain``; ``/predict/batch`` takes lists):
- JSON ``{"image": "<base64>"}`` — the original release's contract; the string may also be a
  data URL (``data:image/png;base64,...``), wrapped base64, URL-safe base64 or lack padding;
- ``multipart/form-data`` with a file (or a base64 string) in the field ``image``.

Every problem raises :class:`ApiError` (an HTTP status and a one-line message):
400 for a malformed request, 413 for too large (bytes or pixels), 415 for a content type the
server does not read, 422 for bytes that are not a usable image. Images are checked from
their header (size, pixel count) before any pixel is decoded, so a decompression bomb costs
nothing.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from dfd_lib.data.images import ImageLoadError, load_rgb

# Formats the server opens (Pillow knows many more; fewer decoders, less attack surface).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
STRICT_MODES = ("RGB", "L")  # with strict_modes: plain 8-bit colour or greyscale only
JSON_TYPES = ("application/json", "")  # a body without a content type is read as JSON, as Flask's force=True did
MAX_ECHO_CHARS = 60  # most characters of request content (a key, a content type, a path) quoted in an error
MAX_ERROR_CHARS = 400  # most characters of any error message: errors never echo more than a bounded prefix


def prefix(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: what an error may quote of a request."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class ApiError(HTTPException):
    """A request the server refuses: ``status_code`` and a one-line ``detail`` (at most ``MAX_ERROR_CHARS``)."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=prefix(message, MAX_ERROR_CHARS), headers=headers)


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be."""

    max_pixels: int
    min_side: int
    strict_modes: bool = False

    def __post_init__(self):
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")


# --------------------------------------------------------------------------- request bodies


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(kind: str) -> bool:
    return kind in JSON_TYPES or (kind.startswith("application/") and kind.endswith("+json"))


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


async def read_json_object(request: Request, example: str) -> dict:
    body = await request.body()
    if not body.strip():
        raise ApiError(400, f"empty request body: send JSON {example} or a multipart upload")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid JSON: the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the JSON body must be an object like {example}, got {_type_name(data)}")
    return data


def _missing_field(field: str, present: list[str], where: str) -> ApiError:
    got = f" (got {', '.join(repr(prefix(k)) for k in present[:5])})" if present else ""
    return ApiError(400, f"missing {where} {field!r}{got}")


def decode_base64_image(text, field: str = "image") -> bytes:
    """The bytes of a base64 string or a ``data:...;base64,`` URL; ApiError(400) otherwise."""
    if text is None:
        raise ApiError(400, f"{field!r} is null: send the image as a base64 string")
    if not isinstance(text, str):
        raise ApiError(400, f"{field!r} must be a base64 string or a data URL, got {_type_name(text)}")
    payload = text.strip()
    if payload.startswith("data:"):
        header, comma, payload = payload.partition(",")
        if not comma:
            raise ApiError(400, f"{field!r} is a malformed data URL: no ',' after the header")
        if not header.lower().endswith(";base64"):
            raise ApiError(400, f"{field!r} is a data URL that is not base64-encoded (expected data:image/...;base64,...)")
    payload = "".join(payload.split())  # base64 wrapped at 76 columns is common
    if not payload:
        raise ApiError(400, f"{field!r} is empty")
    if "-" in payload or "_" in payload:  # URL-safe alphabet
        payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{field!r} is not valid base64 ({exc})") from None
    if not data:
        raise ApiError(400, f"{field!r} decodes to 0 bytes")
    return data


async def _form_value_bytes(value, field: str) -> bytes:
    if isinstance(value, UploadFile):
        data = await value.read()
        if not data:
            raise ApiError(400, f"the uploaded file in {field!r} is empty (0 bytes)")
        return data
    return decode_base64_image(value, field)


async def read_form(request: Request, max_part_bytes: int):
    try:
        return await request.form(max_files=1000, max_fields=1000, max_part_size=max_part_bytes)
    except HTTPException as exc:  # Starlette reports multipart syntax errors as 400
        raise ApiError(400, f"malformed multipart body: {exc.detail}") from None
    except (ValueError, KeyError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None


def _unsupported(kind: str) -> ApiError:
    return ApiError(415, f"unsupported content type {prefix(kind)!r}: send application/json or multipart/form-data")


async def read_image_bytes(request: Request, max_part_bytes: int, field: str = "image") -> bytes:
    """The one image of a ``/predict``-style request."""
    kind = media_type(request)
    if _is_json(kind):
        data = await read_json_object(request, '{"image": "<base64>"}')
        if field not in data:
            raise _missing_field(field, list(data), "field")
        return decode_base64_image(data[field], field)
    if kind == "multipart/form-data":
        form = await read_form(request, max_part_bytes)
        if field not in form:
            raise _missing_field(field, list(form.keys()), "form field")
        return await _form_value_bytes(form[field], field)
    raise _unsupported(kind)


async def read_image_list(request: Request, max_part_bytes: int, max_images: int, field: str = "images") -> list:
    """The images of a batch request, each either ``bytes`` or an :class:`ApiError` for that
    item alone (one bad image does not spoil the batch)."""
    kind = media_type(request)
    if _is_json(kind):
        data = await read_json_object(request, '{"images": ["<base64>", ...]}')
        if field not in data:
            raise _missing_field(field, list(data), "field")
        items = data[field]
        if not isinstance(items, list):
            raise ApiError(400, f"{field!r} must be a list of base64 strings, got {_type_name(items)}")
    elif kind == "multipart/form-data":
        form = await read_form(request, max_part_bytes)
        items = form.getlist(field)
        if not items:
            raise _missing_field(field, list(form.keys()), "form field")
    else:
        raise _unsupported(kind)
    if not items:
        raise ApiError(400, f"{field!r} is an empty list")
    if len(items) > max_images:
        raise ApiError(413, f"{len(items)} images in one batch; the limit is {max_images}")
    out: list = []
    for i, item in enumerate(items):
        try:
            out.append(await _form_value_bytes(item, f"{field}[{i}]"))
        except ApiError as exc:
            out.append(exc)
    return out


# --------------------------------------------------------------------------- image bytes


def vet_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode ``data`` into RGB after checking its header against ``limits``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ApiError(422, f"not an image: the data is none of {', '.join(ACCEPTED_FORMATS)}") from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice its pixel limit
        raise ApiError(413, f"image too large (decompression bomb refused): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(422, f"cannot read the image header: {exc}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ApiError(
            413, f"image too large: {width}x{height} = {width * height:,} pixels exceeds the limit of {limits.max_pixels:,}"
        )
    if min(width, height) < limits.min_side:
        raise ApiError(422, f"image too small: {width}x{height} pixels; each side must be at least {limits.min_side} px")
    if limits.strict_modes and image.mode not in STRICT_MODES:
        raise ApiError(422, f"colour mode {image.mode} refused: this server accepts 8-bit RGB or greyscale only (strict modes)")
    try:
        return load_rgb(image, max_pixels=limits.max_pixels)
    except ImageLoadError as exc:
        raise ApiError(422, exc.reason) from None
