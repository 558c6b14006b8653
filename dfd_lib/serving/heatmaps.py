"""The heatmap ``POST /explain`` draws over an image: Grad-CAM (what the experts looked at, any mixture) or the
localisation heads' map (where the mixture predicts the image was edited, issue 28), chosen with ``?map=``:

- ``grad-cam`` (the default, as before heads existed);
- ``localisation``: the heads' map; 400 for a mixture without heads, or with ``?expert=`` (the map is the mixture's);
- ``auto``: the heads' map when the mixture has heads and no ``?expert=`` is asked, else Grad-CAM.

The answer says which it drew (``heatmap_kind``); a localisation answer also carries the raw map (``map``: an
8-bit greyscale PNG at the scored image's resolution, 255 = edited). With faces on, both kinds are of the crop of
the face that decides (the whole image without one).
"""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
from fastapi import Query
from PIL import Image
from starlette.concurrency import run_in_threadpool

from dfd_lib.scoring import explain
from dfd_lib.scoring.maps import HEATMAP_KINDS, map_image
from dfd_lib.serving.face_requests import face_fields, score_faces
from dfd_lib.serving.request_parsing import ApiError

MAP_CHOICES = (*HEATMAP_KINDS, "auto")
MAP_QUERY = Query("grad-cam", description="the heatmap: grad-cam (what the experts looked at), localisation (where the "
                                          "mixture's localisation heads predict an edit; 400 without heads) or auto "
                                          "(localisation when the mixture has heads, else grad-cam)")


def heatmap_kinds(predictor) -> list[str]:
    """The heatmaps this predictor can draw (``/health``)."""
    return list(HEATMAP_KINDS) if predictor.has_maps else ["grad-cam"]


def heatmap_kind(predictor, requested: str, expert: int | None) -> str:
    """The kind of heatmap to draw for ``?map=requested``; an :class:`ApiError` when it cannot be drawn."""
    if requested not in MAP_CHOICES:
        raise ApiError(400, f"map must be one of {', '.join(MAP_CHOICES)}, got {requested[:40]!r}")
    if requested == "auto":
        return "localisation" if predictor.has_maps and expert is None else "grad-cam"
    if requested == "localisation" and not predictor.has_maps:
        raise ApiError(400, "this mixture has no localisation heads (trained with mask_weight 0): no map; "
                            "ask for map=grad-cam (or auto) instead")
    if requested == "localisation" and expert is not None:
        raise ApiError(400, "the localisation map is the mixture's: expert= selects one expert's Grad-CAM")
    return requested


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _height_width(picture: np.ndarray | Image.Image) -> tuple[int, int]:
    return (picture.height, picture.width) if isinstance(picture, Image.Image) else picture.shape[:2]


async def heatmap_fields(served, rgb: np.ndarray | Image.Image, tensor: torch.Tensor, experts: list[int] | None,
                         kind: str) -> dict:
    """Scores and the ``kind`` heatmap of one preprocessed image (``rgb`` is what the heatmap is drawn over)."""
    predictor = served.predictor
    if kind == "localisation":
        size = _height_width(rgb)
        scores, localisation = await served.worker.call(lambda: predictor.localise_tensor(tensor, size))
        prob, expert_probs = float(scores["prob"][0]), [float(p) for p in scores["expert_probs"][0]]
        overlay, raw = await run_in_threadpool(lambda: (png_data_url(explain.overlay_heatmap(rgb, localisation)),
                                                        png_data_url(map_image(localisation))))
        return {"result": prob, "experts": expert_probs, "heatmap": overlay, "heatmap_kind": kind, "map": raw}
    result = await served.worker.call(lambda: explain.explain_tensor(predictor, tensor, experts))
    overlay = await run_in_threadpool(png_data_url, explain.overlay_heatmap(rgb, result.cam))
    return {"result": result.prob, "experts": result.expert_probs, "heatmap": overlay, "heatmap_kind": kind}


async def explain_whole(served, rgb: np.ndarray | Image.Image, tensor: torch.Tensor, experts: list[int] | None, kind: str) -> dict:
    fields = await heatmap_fields(served, rgb, tensor, experts, kind)
    return {**fields, "backbones": served.predictor.config.backbones, **served.verdicts.fields(fields["result"])}


async def explain_faces(served, data: bytes, experts: list[int] | None, kind: str) -> dict:
    """The faces' scores, and the heatmap of the face that decides (the whole image without one)."""
    prepared, scores = await score_faces(served, data)
    chosen = scores.chosen or 0
    fields = await heatmap_fields(served, prepared.crops[chosen], prepared.tensors[chosen], experts, kind)
    return {**fields, "result": scores.prob, "experts": scores.expert_probs, "backbones": served.predictor.config.backbones,
            "heatmap_of": "image" if scores.chosen is None else f"face {chosen}",
            "width": int(prepared.rgb.shape[1]), "height": int(prepared.rgb.shape[0]),
            **served.verdicts.fields(scores.prob), **face_fields(scores)}
