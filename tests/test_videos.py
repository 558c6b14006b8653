"""Frames sampled from videos (dfd_lib.scoring.videos): evenly over the whole video, whether or not its
container says how long it is. Each test video's frame i is grey level 2i, so a returned frame shows
that its index is the frame it holds."""
from __future__ import annotations

import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from dfd_lib.scoring.videos import sample_frames, sample_indices, write_video

FRAMES = 100


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """The same 100 frames as an mp4 (its header gives duration and fps) and as a Matroska stream
    written to a pipe (no duration: the reader cannot know the length before the end)."""
    folder = tmp_path_factory.mktemp("videos")
    mp4 = write_video(folder / "counted.mp4", [np.full((32, 32, 3), 2 * i, np.uint8) for i in range(FRAMES)])
    streamed = folder / "streamed.mkv"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(mp4), "-c", "copy", "-f", "matroska", "-"]
    streamed.write_bytes(subprocess.run(command, check=True, capture_output=True).stdout)
    reader = imageio_ffmpeg.read_frames(str(streamed))
    assert not next(reader).get("duration")  # the container hides its length
    reader.close()
    return {"counted": mp4, "streamed": streamed}


@pytest.mark.parametrize("kind", ["counted", "streamed"])
@pytest.mark.parametrize("count", [8, 5, 16])
def test_frames_are_spread_evenly_over_the_whole_video(videos, kind, count):
    frames = sample_frames(videos[kind], count)
    indices = np.array([index for index, _frame in frames])
    assert len(indices) == count and (np.diff(indices) > 0).all()
    ideal = np.linspace(0, FRAMES - 1, count)
    spacing = (FRAMES - 1) / (count - 1)
    assert np.abs(indices - ideal).max() <= spacing / 2, indices  # early and late frames equally dense
    for index, frame in frames:
        assert abs(float(frame.mean()) - 2 * index) <= 3  # the frame returned is the frame its index names


def test_a_video_shorter_than_the_count_gives_every_frame(videos):
    assert [index for index, _frame in sample_frames(videos["streamed"], 150)] == list(range(FRAMES))
    assert sample_indices(FRAMES, 150) == list(range(FRAMES))
