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
    The frame count comes from the container's duration x fps; frames are decoded in order
    and only the sampled ones are kept, so memory holds at most ``count`` frames."""
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
        wanted = set(sample_indices(estimate, count)) if estimate > 0 else None
        frames: list[tuple[int, np.ndarray]] = []
        try:
            for index, raw in enumerate(reader):
                if wanted is None or index in wanted:
                    frames.append((index, np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy()))
                    if wanted is not None and len(frames) == len(wanted):
                        break
                    if wanted is None and len(frames) > 4 * count:  # unknown length: thin as we go
                        frames = frames[::2]
        except (OSError, RuntimeError) as exc:
            if not frames:
                raise VideoLoadError(f"no frame could be decoded: {_last_line(exc)}", str(path)) from None
    finally:
        reader.close()
    if not frames:
        raise VideoLoadError("the video holds no frames", str(path))
    if wanted is None and len(frames) > count:
        frames = [frames[i] for i in sample_indices(len(frames), count)]
    return frames


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
