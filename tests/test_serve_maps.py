"""``dfd serve``'s heatmaps (issue 28, item 4): ``/explain?map=localisation`` answers the localisation heads' map
(the Predictor's, as an overlay and raw), ``auto`` picks it when the mixture has heads and Grad-CAM when it has
none, ``/health`` says which heatmaps the server draws, and the original contract and Grad-CAM are unchanged."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as skdata
from test_serve import b64, encode, make_tiny_weights

from dfd_lib.scoring.explain import overlay_heatmap
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import create_app
from dfd_lib.serving.face_requests import FaceServing


def decode_png(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def edited_photo() -> np.ndarray:
    """A real photo (skimage's coffee, 400 x 600) with a block of another (the astronaut) spliced in."""
    photo = skdata.coffee().copy()
    photo[100:228, 200:328] = skdata.astronaut()[40:168, 180:308]
    return photo


@pytest.fixture(scope="module")
def heads_predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(make_tiny_weights(tmp_path_factory.mktemp("moe_heads"), localisation_head="light"), device="cpu")


@pytest.fixture(scope="module")
def heads_client(heads_predictor) -> TestClient:
    return TestClient(create_app(heads_predictor))


@pytest.fixture(scope="module")
def plain_client(tmp_path_factory) -> TestClient:
    return TestClient(create_app(Predictor.load(make_tiny_weights(tmp_path_factory.mktemp("moe")), device="cpu")))


def test_explain_answers_the_heads_map_on_request(heads_client, heads_predictor):
    photo = edited_photo()
    raw = encode(photo)
    body = heads_client.post("/explain?map=localisation", json={"image": b64(raw)}).json()
    assert body["heatmap_kind"] == "localisation"
    [expected] = heads_predictor.predict_maps([raw])
    drawn = np.asarray(decode_png(body["map"]), dtype=np.float32) / 255.0
    assert drawn.shape == photo.shape[:2] and np.abs(drawn - expected).max() <= 1 / 255 + 1e-6
    overlay = overlay_heatmap(photo, expected)
    assert np.array_equal(np.asarray(decode_png(body["heatmap"]).convert("RGB")), np.asarray(overlay))
    plain = heads_client.post("/predict", json={"image": b64(raw)})
    assert body["result"] == plain.json()["result"] and plain.content == f'{{"result":{body["result"]}}}\n'.encode()
    assert heads_client.post("/explain?map=auto", json={"image": b64(raw)}).json()["heatmap"] == body["heatmap"]
    gradcam = heads_client.post("/explain", json={"image": b64(raw)}).json()  # the default is still Grad-CAM
    assert gradcam["heatmap_kind"] == "grad-cam" and "map" not in gradcam and gradcam["heatmap"] != body["heatmap"]
    # one expert's heatmap is Grad-CAM: auto draws it, asking for the mixture's map with it is refused
    assert heads_client.post("/explain?map=auto&expert=1", json={"image": b64(raw)}).json()["heatmap_kind"] == "grad-cam"
    refused = heads_client.post("/explain?map=localisation&expert=1", json={"image": b64(raw)})
    assert refused.status_code == 400 and "mixture's" in refused.json()["error"]
    health = heads_client.get("/health").json()
    assert health["heatmaps"] == ["grad-cam", "localisation"] and health["model"]["localisation_head"] == "light"


def test_without_heads_auto_is_grad_cam_and_the_map_is_refused_clearly(plain_client):
    raw = encode(edited_photo())
    auto = plain_client.post("/explain?map=auto", json={"image": b64(raw)})
    assert auto.status_code == 200 and auto.json()["heatmap_kind"] == "grad-cam" and "map" not in auto.json()
    assert auto.json()["heatmap"] == plain_client.post("/explain", json={"image": b64(raw)}).json()["heatmap"]
    refused = plain_client.post("/explain?map=localisation", json={"image": b64(raw)})
    assert refused.status_code == 400 and "no localisation heads" in refused.json()["error"]
    wrong = plain_client.post("/explain?map=edits", json={"image": b64(raw)})
    assert wrong.status_code == 400 and "map must be one of" in wrong.json()["error"]
    health = plain_client.get("/health").json()
    assert health["heatmaps"] == ["grad-cam"] and health["model"]["localisation_head"] is None
    schema = plain_client.get("/openapi.json").json()
    assert "map" in {p["name"] for p in schema["paths"]["/explain"]["post"]["parameters"]}


def test_with_faces_the_map_is_the_deciding_faces_crop(heads_predictor):
    client = TestClient(create_app(heads_predictor, faces=FaceServing(default_on=True)))
    raw = encode(skdata.astronaut())
    body = client.post("/explain?map=localisation", json={"image": b64(raw)}).json()
    assert body["faces_found"] == 1 and body["heatmap_of"] == "face 0" and body["heatmap_kind"] == "localisation"
    left, top, right, bottom = body["faces"][0]["box"]
    side = decode_png(body["map"]).size
    assert side[0] == side[1] and side[0] >= max(right - left, bottom - top)  # the square crop around the face


@pytest.mark.slow
def test_served_through_openvino_the_scores_are_openvinos_and_the_map_torchs(heads_predictor, tmp_path, monkeypatch):
    """A mixture with heads served with ``--backend openvino``: its scores come from the export (within 1e-5 of
    torch), its map from the torch model, as served in torch."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = make_tiny_weights(tmp_path / "moe_heads", localisation_head="light")
    converted = Predictor.load(weights, device="cpu", backend="openvino", export_dir=tmp_path / "export")
    raw = encode(edited_photo())
    served = {name: TestClient(create_app(predictor)).post("/explain?map=localisation", json={"image": b64(raw)}).json()
              for name, predictor in (("openvino", converted), ("torch", Predictor.load(weights, device="cpu")))}
    assert converted.backend == "openvino" and served["openvino"]["heatmap_kind"] == "localisation"
    assert served["openvino"]["result"] == pytest.approx(served["torch"]["result"], abs=1e-5)
    drawn = {name: np.asarray(decode_png(body["map"]), dtype=np.int16) for name, body in served.items()}
    assert np.abs(drawn["openvino"] - drawn["torch"]).max() <= 1  # the same torch map (8-bit)
