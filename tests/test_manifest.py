"""Manifest readers: competition CSV layout, real/ fake/ folders, saved manifests."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dfd_lib.data.manifest import Manifest, ManifestError
from dfd_lib.data.readers import read_competition, read_dataset, read_real_fake_folders


def _write_image(path, seed, mode="RGB", fmt=None, size=(24, 20)):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:600])
    return path


def _tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_competition_layout_with_corrupt_and_odd_files(tmp_path):
    images = tmp_path / "trainset"
    _write_image(images / "a.jpg", 0)
    _write_image(images / "b.png", 1, mode="RGBA")
    _write_image(images / "c.png", 2, mode="P")
    _write_image(images / "d.jpg", 3, mode="CMYK")
    _write_image(images / "e.png", 4, mode="L")
    _truncated_jpeg(images / "broken.jpg")
    (images / "notes.jpg").write_text("not an image")
    labels = tmp_path / "trainset_label.txt"
    labels.write_text("img_name,target\na.jpg,0\nb.png,1\nc.png,1\nd.jpg,0\ne.png,0\nbroken.jpg,1\nnotes.jpg,0\nmissing.jpg,1\nx.jpg,7\n")
    before = _tree_digest(images)

    manifest = read_competition(images, labels, split="train", progress=False)

    assert sorted(p.rsplit("/", 1)[-1] for p in manifest.table["path"]) == ["a.jpg", "b.png", "c.png", "d.jpg", "e.png"]
    assert manifest.table.set_index(manifest.table["path"].str.rsplit("/", n=1).str[-1])["label"].to_dict() == {
        "a.jpg": 0, "b.png": 1, "c.png": 1, "d.jpg": 0, "e.png": 0}
    reasons = dict(zip(manifest.skipped["path"].str.rsplit("/", n=1).str[-1], manifest.skipped["reason"]))
    assert set(reasons) == {"broken.jpg", "notes.jpg", "missing.jpg", "x.jpg"}
    assert "truncated" in reasons["broken.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "not found" in reasons["missing.jpg"]
    assert "0 or 1" in reasons["x.jpg"]
    assert (manifest.table["split"] == "train").all()
    assert manifest.table["width"].tolist() == [24] * 5 and manifest.table["hash"].str.len().eq(40).all()
    assert _tree_digest(images) == before  # the source dataset is never modified


def test_competition_csv_without_header(tmp_path):
    _write_image(tmp_path / "imgs" / "a.jpg", 0)
    (tmp_path / "labels.csv").write_text("a.jpg,1\n")
    manifest = read_competition(tmp_path / "imgs", tmp_path / "labels.csv", progress=False)
    assert manifest.table["label"].tolist() == [1]


def test_real_fake_folders_at_any_depth(tmp_path):
    root = tmp_path / "collection"
    _write_image(root / "setA" / "real" / "r1.jpg", 0)
    _write_image(root / "setA" / "real" / "sub" / "r2.webp", 1, fmt="WEBP")
    _write_image(root / "setA" / "fake" / "gan" / "f1.png", 2)
    _write_image(root / "deeper" / "setB" / "FAKE" / "diffusion" / "x" / "f2.bmp", 3)
    _write_image(root / "deeper" / "setB" / "Real" / "r3.jpeg", 4)
    _write_image(root / "unlabelled" / "u.png", 5)
    (root / "setA" / "real" / "readme.txt").write_text("hello")
    _truncated_jpeg(root / "setA" / "fake" / "gan" / "cut.jpg")

    manifest = read_real_fake_folders(root, progress=False)
    table = manifest.table.assign(name=manifest.table["path"].str.rsplit("/", n=1).str[-1]).set_index("name")
    assert sorted(table.index) == ["f1.png", "f2.bmp", "r1.jpg", "r2.webp", "r3.jpeg"]
    assert table.loc["f1.png", ["label", "family", "source"]].tolist() == [1, "gan", "setA"]
    assert table.loc["f2.bmp", ["label", "family", "source"]].tolist() == [1, "diffusion", "deeper/setB"]
    assert table.loc["r2.webp", ["label", "family"]].tolist() == [0, "real"]
    skipped = set(manifest.skipped["path"].str.rsplit("/", n=1).str[-1])
    assert skipped == {"readme.txt", "cut.jpg"}


def test_save_and_load_round_trip(tmp_path):
    root = tmp_path / "ds"
    _write_image(root / "real" / "r.png", 0)
    _write_image(root / "fake" / "f.png", 1)
    (root / "fake" / "bad.png").write_bytes(b"\x89PNG\r\n")
    manifest = read_dataset(root, progress=False)
    out = manifest.save(root / "manifest.csv")
    assert "real/r.png" in out.read_text()  # stored relative to the manifest's folder
    loaded = Manifest.load(out)
    pd.testing.assert_frame_equal(loaded.table.drop(columns=["split", "cluster"]),
                                  manifest.table.drop(columns=["split", "cluster"]), check_dtype=False)
    assert len(loaded.skipped) == 1
    assert read_dataset(out).table["path"].tolist() == manifest.table["path"].tolist()


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no real/ or fake/"):
        read_real_fake_folders(tmp_path / "empty")
    with pytest.raises(ManifestError, match="labels must be 0"):
        Manifest(pd.DataFrame({"path": ["a"], "label": [3]}))
    (tmp_path / "labels.csv").write_text("a,b,c\n1,2,3\n")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ManifestError, match="img_name,target"):
        read_competition(tmp_path / "imgs", tmp_path / "labels.csv")
