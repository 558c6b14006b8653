"""Face-centred scoring in ``dfd serve``: ``?faces=true`` on ``/predict``, ``/predict/batch``
and ``/explain`` (or ``dfd serve --faces`` for every request; ``?faces=false`` turns it off).

Each face found is cropped and scored as in ``dfd predict --faces``
(:mod:`dfd_lib.scoring.faces`); the answer's ``result`` is the rule's score (``max``: the
most-fake face) and ``faces`` lists every face's box (left top right bottom, image pixels)
and score; ``faces_found`` 0 means no face was found and the whole image was scored.
A photo with more faces than ``max_faces`` is refused with 422 (every face is a forward pass).
The server scores images only: videos are for ``dfd predict``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from dfd_lib.data.images import ImageLoadError
from dfd_lib.scoring.faces import FaceBox, FaceDetector, FaceOptions, FaceScores, crop_square, summarise_faces
from dfd_lib.scoring.file_crops import decode_rgb
from dfd_lib.serving.request_parsing import ApiError, vet_image

DEFAULT_MAX_FACES = 8


@dataclass
class FaceServing:
    """The server's face settings and its one detector (OpenCV nets are not thread-safe:
    detections take turns under ``lock``)."""

    default_on: bool = False
    options: FaceOptions = field(default_factory=FaceOptions)
    max_faces: int = DEFAULT_MAX_FACES
    detector: FaceDetector = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self):
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}")
        self.detector = FaceDetector(self.options)

    def wanted(self, requested: bool | None) -> bool:
        return self.default_on if requested is None else requested

    def info(self) -> dict:
        return {"default": self.default_on, "rule": self.options.rule, "margin": self.options.margin,
                "max_faces": self.max_faces, "min_face": self.options.min_face}


@dataclass
class FacePrepared:
    """One uploaded image, cut into what is scored: its faces' crops, or the whole image."""

    rgb: np.ndarray
    crops: list[np.ndarray]
    tensors: list[torch.Tensor]
    boxes: list[FaceBox]


def prepare_faces(served, data: bytes) -> FacePrepared:
    """Vet, decode, find faces, crop and preprocess (runs in the thread pool)."""
    image = vet_image(data, served.limits)
    predictor, faces = served.predictor, served.faces
    try:  # compat mode decodes the bytes with OpenCV, as the original did
        rgb = decode_rgb(data, "compat") if predictor.preprocess == "compat" else np.asarray(image)
    except ImageLoadError as exc:
        raise ApiError(422, exc.reason) from None
    with faces.lock:
        boxes = faces.detector.detect(rgb)
    if len(boxes) > faces.max_faces:
        raise ApiError(422, f"{len(boxes)} faces found; this server scores at most {faces.max_faces} per image "
                            f"(dfd serve --max-faces); send a crop, or score without faces (faces=false)")
    crops = [crop_square(rgb, box, faces.options.margin) for box in boxes] or [rgb]
    return FacePrepared(rgb, crops, [predictor.to_tensor(crop) for crop in crops], boxes)


async def score_faces(served, data: bytes) -> tuple[FacePrepared, FaceScores]:
    prepared = await run_in_threadpool(prepare_faces, served, data)
    scores = await served.worker.score(prepared.tensors)
    summary = summarise_faces([p for p, _ in scores], [e for _, e in scores], prepared.boxes, served.faces.options.rule)
    return prepared, summary


def face_fields(scores: FaceScores) -> dict:
    """What an answer adds with faces on."""
    return {"faces": scores.faces(), "faces_found": scores.faces_found, "face_rule": scores.rule,
            "face_chosen": scores.chosen}
