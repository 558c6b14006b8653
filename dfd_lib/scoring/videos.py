"""Frames out of video files for scoring: ``count`` frames sampled evenly over the video,
decoded by the ffmpeg binary that the imageio-ffmpeg wheel carries (nothing to install).

A video's score is the mean of its frames' scores (the max is given beside it); the frames
go through the same path as photos, faces included. A file ffmpeg cannot open, or one
without a single decodable frame, raises :class:`VideoLoadError` with ffmpeg's reason, and
is listed like an unreadable image.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from dfd_lib.data.images import ImageLoadError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv")
DEFAULT_FRAMES = 16


class VideoLoadError(ImageLoadError):
    """A video that cannot be used; ``reason`` says why in one line."""


def is_video_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith(" ")]
    useful = [line for line in lines if "error" in line.lower() or "invalid" in line.lower()]
    return (useful or lines or [type(exc).__name__])[-1][:300]


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames (all when fewer)."""
    if count < 1:
        raise ValueError(f"the frame count must be >= 1, got {count}")
    if total <= count:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


def sample_frames(path: str | os.PathLike, count: int = DEFAULT_FRAMES) -> list[tuple[int, np.ndarray]]:
    """``(frame index, HxWx3 uint8 RGB)`` for ``count`` frames spread evenly over the video.
    The frame count comes from the container's duration x fps; frames are decoded in order and
    only the sampled ones are kept. A container that hides its length (a stream written to a pipe,
    a raw H.264 file) is sampled by :func:`_evenly_thinned`. Memory holds at most ``4 * count + 1`` frames."""
    path = Path(path)
    if not path.is_file():
        raise VideoLoadError("no such file", str(path))
    if path.stat().st_size == 0:
        raise VideoLoadError("empty file (0 bytes)", str(path))
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        try:
            meta = next(reader)
        except (OSError, RuntimeError, StopIteration) as exc:
            raise VideoLoadError(f"not a readable video: {_last_line(exc)}", str(path)) from None
        width, height = meta["size"]
        duration, fps = float(meta.get("duration") or 0), float(meta.get("fps") or 0)
        estimate = int(round(duration * fps)) if math.isfinite(duration * fps) else 0
        decoded = ((index, np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)) for index, raw in enumerate(reader))
        frames: list[tuple[int, np.ndarray]] = []
        try:
            if estimate > 0:
                wanted = set(sample_indices(estimate, count))
                for index, frame in decoded:
                    if index in wanted:
                        frames.append((index, frame.copy()))
                        if len(frames) == len(wanted):
                            break
            else:
                _evenly_thinned(decoded, count, frames)
        except (OSError, RuntimeError) as exc:
            if not frames:
                raise VideoLoadError(f"no frame could be decoded: {_last_line(exc)}", str(path)) from None
    finally:
        reader.close()
    if not frames:
        raise VideoLoadError("the video holds no frames", str(path))
    if estimate <= 0 and len(frames) > count:
        frames = [frames[i] for i in sample_indices(len(frames), count)]
    return frames


def _evenly_thinned(decoded, count: int, kept: list[tuple[int, np.ndarray]]) -> None:
    """Frames of a video of unknown length, evenly spaced over all of it, appended to ``kept``: every
    ``stride``-th frame is kept, and when more than ``4 * count`` are held the stride doubles and every
    other kept frame goes, so the frames kept stay ``stride`` apart from the first frame to the last
    (the caller then picks ``count`` of them evenly). ``kept`` is filled in place, so a decoding error
    part-way still leaves the frames read so far."""
    stride = 1
    for index, frame in decoded:
        if index % stride:
            continue
        kept.append((index, frame.copy()))
        if len(kept) > 4 * count:
            stride *= 2
            kept[:] = [(i, f) for i, f in kept if i % stride == 0]


def write_video(path: str | os.PathLike, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """Write HxWx3 uint8 RGB frames as an H.264 mp4 (even sides) with imageio-ffmpeg; for
    tests, benchmarks and examples."""
    path = Path(path)
    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, macro_block_size=2,
                                         codec="libx264", output_params=["-loglevel", "error"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame[:height, :width]))
    writer.close()
    return path
