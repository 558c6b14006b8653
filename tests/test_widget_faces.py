"""Notebook 05's upload widget with "score faces" on: each face scored as a crop, its box
drawn on the thumbnail in its score's colour, the note saying which face decided."""
from __future__ import annotations

import numpy as np
from skimage import data as skdata
from test_predict_stream import small_face_photo
from test_widgets import browser_record, jpeg, predictor  # noqa: F401 - the fixture

from dfd_lib.data.images import load_rgb
from dfd_lib.scoring import widgets
from dfd_lib.scoring.faces import FaceDetector, face_crops, score_colour


def test_the_widget_scores_faces_and_draws_their_boxes(predictor):  # noqa: F811 - the fixture
    app = widgets.build_upload_app(predictor, threshold=0.5, faces=True)
    photo = small_face_photo(skdata.astronaut(), 0.35, (400, 150))
    app.upload.set_state({"value": [browser_record("small_face.jpg", jpeg(photo)),
                                    browser_record("coffee.jpg", jpeg(skdata.coffee()))]})
    with_face, without = app.results
    crops, boxes = face_crops(np.asarray(load_rgb(jpeg(photo))), FaceDetector())
    [box] = boxes
    expected = predictor.predict(crops)[0]
    assert with_face.faces.faces_found == 1 and with_face.faces.boxes == boxes
    assert with_face.prediction.prob == expected.prob  # the face crop's score, not the photo's
    thumb = np.asarray(with_face.thumbnail)  # 640x427 shrunk to 256 wide: the box's left edge in its colour
    scale = 256 / 640
    edge = thumb[int((box.top + box.bottom) / 2 * scale), int(box.left * scale)]
    assert np.abs(edge.astype(int) - score_colour(expected.prob)).max() < 60
    assert "1 face(s) found" in app.cards[0].box.children[-1].children[-1].value
    assert without.faces.faces_found == 0 and "whole image" in app.cards[1].box.children[-1].children[-1].value
    app.faces.value = False  # off: the whole photo
    app.upload.set_state({"value": [browser_record("again.jpg", jpeg(photo))]})
    assert app.results[0].faces is None and app.results[0].prediction.prob != expected.prob
