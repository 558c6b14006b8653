"""The worker side of ``dfd predict`` (:mod:`dfd_lib.scoring.stream`): walk the inputs lazily,
decode each file (photo, or a video's sampled frames), find its faces and preprocess the crops.

Kept free of the model's imports: DataLoader workers are spawned processes, and each one
imports only this module (a second or two instead of the model code's several).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dfd_lib.data.images import ImageLoadError, ImageSource, load_rgb
from dfd_lib.data.preprocess import InputTransform, TiledTransform
from dfd_lib.scoring.faces import FaceDetector, FaceOptions, face_crops
from dfd_lib.scoring.inputs import iter_input_files
from dfd_lib.scoring.videos import DEFAULT_FRAMES, is_video_path, sample_frames


def decode_rgb(source: ImageSource, preprocess: str = "default") -> np.ndarray:
    """HxWx3 uint8 RGB the way ``preprocess`` decodes (a function, so DataLoader workers can
    call it without the model); raises ImageLoadError with the reason."""
    image = load_rgb(source)  # vets every input, in both modes
    if preprocess == "compat" and isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        if isinstance(source, (str, os.PathLike)):
            encoded = np.fromfile(str(source), dtype=np.uint8)
        else:
            encoded = np.frombuffer(bytes(source), dtype=np.uint8)
        bgr = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ImageLoadError("OpenCV cannot decode this image (compat mode)", str(source)[:200])
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return np.asarray(image)


@dataclass
class FileCrops:
    """One file, decoded and cropped: ``tensor`` holds every crop of every view; ``views``
    is ``(frame index or -1, number of crops, face boxes)`` per frame (one view for a photo)."""

    path: str
    kind: str  # image | video
    tensor: torch.Tensor
    views: list[tuple[int, int, list]] = field(default_factory=list)
    error: str = ""
    size: tuple[int, int] = (0, 0)  # a photo's (height, width): where its localisation map is drawn


class ScoringFiles(IterableDataset):
    """Decodes, detects faces and preprocesses each file; worker ``k`` of ``W`` takes every
    ``W``-th file, so the DataLoader yields them in input order."""

    def __init__(self, inputs: list[str], transform: InputTransform | TiledTransform, preprocess: str = "default",
                 faces: FaceOptions | None = None, frames: int = DEFAULT_FRAMES, skip: frozenset[str] = frozenset()):
        self.inputs = inputs
        self.transform = transform
        self.preprocess = preprocess
        self.frames = frames
        self.skip = skip
        self.detector = FaceDetector(faces) if faces is not None else None

    def files(self) -> Iterator[Path]:
        return (p for p in iter_input_files(self.inputs) if str(p) not in self.skip)

    def __iter__(self) -> Iterator[FileCrops]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, path in enumerate(self.files()):
            if index % workers == worker:
                yield self.load(path)

    def _crops(self, rgb: np.ndarray) -> tuple[list[np.ndarray], list]:
        return face_crops(rgb, self.detector) if self.detector is not None else ([rgb], [])

    def load(self, path: Path) -> FileCrops:
        video = is_video_path(path)
        kind = "video" if video else "image"
        try:
            frames = sample_frames(path, self.frames) if video else [(-1, decode_rgb(path, self.preprocess))]
        except ImageLoadError as exc:
            return FileCrops(str(path), kind, torch.empty(0), error=exc.reason)
        tensors, views = [], []
        for frame, rgb in frames:
            crops, boxes = self._crops(rgb)
            tensors.extend(self.transform(crop) for crop in crops)
            views.append((frame, len(crops), boxes))
        size = (0, 0) if video else frames[0][1].shape[:2]
        return FileCrops(str(path), kind, torch.stack(tensors), views, size=size)


def worker_init(_worker_id: int) -> None:
    cv2.setNumThreads(1)  # one decoding process per core; OpenCV's own threads would oversubscribe


def as_is(item: FileCrops) -> FileCrops:
    return item
