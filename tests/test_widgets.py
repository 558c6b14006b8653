"""Notebook 05's upload widget, driven as an upload drives it, and folder scoring."""
from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata
from test_serve import make_tiny_weights
from test_serve_maps import edited_photo
from traitlets import Bunch

from dfd_lib.data.images import load_rgb
from dfd_lib.data.manifest import Manifest
from dfd_lib.scoring import explain, widgets
from dfd_lib.scoring import folders as folder_scoring
from dfd_lib.scoring.faces import FaceDetector
from dfd_lib.scoring.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(make_tiny_weights(tmp_path_factory.mktemp("moe")), malloc_tuning=False)


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def browser_record(name: str, content: bytes, kind: str = "image/jpeg") -> dict:
    """A file as the browser side of FileUpload sends it (before deserialisation)."""
    return {"name": name, "type": kind, "size": len(content), "content": memoryview(content), "last_modified": 1_700_000_000_000}


def test_an_upload_scores_each_file_and_shows_a_card(predictor):
    app = widgets.build_upload_app(predictor, threshold=0.5)
    astronaut, coffee = jpeg(skdata.astronaut()), jpeg(skdata.coffee())
    # exactly what the frontend does: the JSON state goes through the widget's deserialiser
    app.upload.set_state({"value": [browser_record("astronaut.jpg", astronaut),
                                    browser_record("notes.txt", b"not an image", "text/plain")]})
    assert [r.name for r in app.results] == ["astronaut.jpg", "notes.txt"]
    scored, failed = app.results
    expected = predictor.predict_one(load_rgb(astronaut))
    assert scored.prediction.prob == expected.prob
    assert scored.prediction.expert_probs == expected.expert_probs and len(scored.prediction.expert_probs) == 2
    assert scored.thumbnail.size == (256, 256) and scored.overlay.size == (256, 256)
    assert not failed.prediction.ok and "not an image" in failed.prediction.error
    assert len(app.results_box.children) == 2 and "1 unreadable" in app.status.value
    card = app.cards[0]
    assert [bar.value for bar in card.bars] == expected.expert_probs
    assert f"{expected.prob:.4f}" in card.verdict.value
    # a second upload (set as a Python value) goes on top
    app.upload.value = (Bunch(name="coffee.jpg", type="image/jpeg", size=len(coffee), content=memoryview(coffee),
                              last_modified=datetime.now(timezone.utc)),)
    assert [r.name for r in app.results] == ["coffee.jpg", "astronaut.jpg", "notes.txt"]
    assert app.results[0].prediction.prob == predictor.predict_one(load_rgb(coffee)).prob


def test_the_threshold_recolours_verdicts_without_rescoring(predictor):
    app = widgets.build_upload_app(predictor, with_heatmap=False)
    widgets.handle_upload(app, [browser_record("chelsea.jpg", jpeg(skdata.chelsea()))])
    card = app.cards[0]
    prob = card.result.prediction.prob
    assert card.result.overlay is None
    app.threshold.value = max(0.0, prob - 0.01)
    assert "FAKE" in card.verdict.value
    assert all(bar.bar_style == ("danger" if bar.value >= app.threshold.value else "success") for bar in card.bars)
    app.threshold.value = min(1.0, prob + 0.01)
    assert "REAL" in card.verdict.value and card.result.prediction.prob == prob
    assert widgets.handle_upload(app, ()) == []  # clearing the widget scores nothing
    with pytest.raises(ValueError, match="threshold"):
        widgets.build_upload_app(predictor, threshold=2.0)


def test_a_decompression_bomb_upload_is_refused_not_raised(predictor):
    from test_serve import png_claiming

    result = widgets.score_upload(predictor, "bomb.png", png_claiming(30_000, 30_000))
    assert not result.prediction.ok and "decompression bomb" in result.prediction.error


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    photos = {"real": [skdata.astronaut(), skdata.coffee(), skdata.chelsea()],
              "fake": [skdata.rocket(), skdata.astronaut()[::-1], skdata.coffee()[:, ::-1]]}
    for label, images in photos.items():
        (root / label).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / label / f"{label}_{i}.png")
    (root / "fake" / "broken.jpg").write_bytes(jpeg(skdata.camera())[:500])
    return root


def test_score_a_folder_into_a_table_summary_and_histogram(predictor, labelled_folder, tmp_path):
    table = folder_scoring.score_dataset(predictor, folder=labelled_folder, threshold=0.5, progress=False)
    assert len(table) == 7 and table["label"].tolist().count(0.0) == 3 and table["label"].tolist().count(1.0) == 4
    broken = table[table["name"] == "broken.jpg"].iloc[0]
    assert broken["verdict"] == "error" and "truncated" in broken["error"] and math.isnan(broken["prob_fake"])
    ok = table[table["error"] == ""]
    assert set(ok["verdict"]) <= {"fake", "real"}
    assert ((ok["prob_fake"] >= 0.5) == (ok["verdict"] == "fake")).all()
    reference = predictor.predict_one(str(labelled_folder / "real" / "real_0.png")).prob
    assert ok.set_index("name").loc["real_0.png", "prob_fake"] == pytest.approx(reference, abs=1e-5)  # batched vs alone
    summary = folder_scoring.summarize(table, 0.5)
    assert summary["images"] == 7 and summary["scored"] == 6 and summary["unreadable"] == 1
    assert summary["n_real"] == 3 and summary["n_fake"] == 3 and 0.0 <= summary["auc"] <= 1.0
    figure = tmp_path / "hist.png"
    folder_scoring.plot_score_histogram(table, 0.5, path=figure)
    assert Image.open(figure).size[0] > 300
    assert folder_scoring.top_scored(table, 2) == list(ok.sort_values("prob_fake", ascending=False)["path"][:2])
    subset = folder_scoring.score_dataset(predictor, folder=labelled_folder, limit=3, progress=False)
    assert len(subset) == 3


def test_score_a_manifest_split(predictor, labelled_folder, tmp_path):
    paths = sorted(str(p) for p in labelled_folder.rglob("*.png"))
    rows = pd.DataFrame({"path": paths, "label": [1 if "/fake/" in p else 0 for p in paths],
                         "family": ["photo"] * len(paths), "split": ["test", "train"] * 3})
    manifest = Manifest(rows).save(tmp_path / "manifest.csv")
    table = folder_scoring.score_dataset(predictor, manifest=manifest, split="test", progress=False)
    assert len(table) == 3 and table["family"].eq("photo").all()
    assert table["label"].tolist() == rows[rows["split"] == "test"]["label"].astype(float).tolist()
    with pytest.raises(ValueError, match="no rows in split 'val'"):
        folder_scoring.score_dataset(predictor, manifest=manifest, split="val", progress=False)
    with pytest.raises(FileNotFoundError):
        folder_scoring.score_dataset(predictor, folder=tmp_path / "nowhere", progress=False)


def test_sortable_table_reorders_on_request():
    table = pd.DataFrame({"path": ["/a", "/b", "/c"], "name": ["a", "b", "c"], "prob_fake": [0.2, 0.9, 0.5], "error": ""})
    box = folder_scoring.sortable_table(table)
    controls, view = box.children
    column, direction, _count = controls.children
    first_row = lambda: view.value.split("<tbody>")[1].split("<td>")[1].split("<")[0]  # noqa: E731
    assert first_row() == "b"  # highest fake probability first
    direction.value = "ascending"
    assert first_row() == "a"
    column.value = "name"
    direction.value = "descending"
    assert first_row() == "c"
    with pytest.raises(ValueError, match="no column"):
        folder_scoring.sortable_table(table, sort_by="missing")


def _texts(box) -> str:
    """Every HTML text inside a widget tree."""
    own = getattr(box, "value", "") if type(box).__name__ == "HTML" else ""
    return own + "".join(_texts(child) for child in getattr(box, "children", ()))


def test_with_localisation_heads_the_overlay_is_the_heads_map_and_grad_cam_a_toggle_away(predictor, tmp_path):
    heads = Predictor.load(make_tiny_weights(tmp_path / "moe", localisation_head="light"), malloc_tuning=False)
    app = widgets.build_upload_app(heads, threshold=0.5)
    assert app.heatmap.value == "localisation" and app.heatmap.layout.display == ""
    buffer = io.BytesIO()
    Image.fromarray(edited_photo()).save(buffer, format="PNG")
    raw = buffer.getvalue()
    app.upload.set_state({"value": [browser_record("edited.png", raw, "image/png")]})
    [result] = app.results
    [expected] = heads.predict_maps([raw])
    drawn = explain.overlay_heatmap(load_rgb(raw), expected, max_side=widgets.THUMBNAIL_SIDE)
    assert result.overlay_kind == "localisation" and np.array_equal(np.asarray(result.overlay), np.asarray(drawn))
    assert result.prediction.prob == heads.predict_one(load_rgb(raw)).prob
    assert "where it was edited (localisation head)" in _texts(app.cards[0].box)
    app.heatmap.value = "grad-cam"  # the next upload's heatmap is Grad-CAM
    app.upload.set_state({"value": [browser_record("again.png", raw, "image/png")]})
    newest = app.results[0]
    gradcam = explain.overlay_heatmap(load_rgb(raw), explain.explain(heads, load_rgb(raw)).cam, max_side=widgets.THUMBNAIL_SIDE)
    assert newest.overlay_kind == "grad-cam" and np.array_equal(np.asarray(newest.overlay), np.asarray(gradcam))
    assert "Grad-CAM" in _texts(app.cards[0].box)
    # with faces on, the map of the face that decides
    faces = widgets.score_upload(heads, "astronaut.jpg", jpeg(skdata.astronaut()), faces=FaceDetector(), heatmap="localisation")
    assert faces.faces.faces_found == 1 and faces.overlay_kind == "localisation" and faces.overlay.width == faces.overlay.height
    # a mixture without heads: Grad-CAM, and no choice shown
    plain = widgets.build_upload_app(predictor, threshold=0.5)
    assert plain.heatmap.value == "grad-cam" and plain.heatmap.layout.display == "none"
