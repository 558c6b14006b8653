"""``dfd serve`` under real use: face-centred crops per request (boxes and scores, the
photo's score by the rule, a 422 past --max-faces), the bounded model queue (503 with
Retry-After when full, serving again once it drains) and ``dfd serve`` finding its weights."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from skimage import data as skdata
from test_predict_stream import small_face_photo
from test_serve import b64, encode, make_tiny_weights

from dfd_lib.scoring.faces import FaceOptions
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import create_app
from dfd_lib.serving.cli import ServeSettings
from dfd_lib.serving.face_requests import FaceServing


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(make_tiny_weights(tmp_path_factory.mktemp("moe")), batch_size=4, malloc_tuning=False)


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def small_face() -> bytes:
    return encode(small_face_photo(skdata.astronaut(), 0.35, (400, 150)), "JPEG", quality=92)


def test_faces_on_request_score_the_face_and_give_its_box(client, small_face):
    whole = client.post("/predict", json={"image": b64(small_face)}).json()
    body = client.post("/predict?faces=true", json={"image": b64(small_face)}).json()
    assert body["faces_found"] == 1 and body["face_rule"] == "max" and body["face_chosen"] == 0
    [face] = body["faces"]
    left, top, right, bottom = face["box"]
    assert 400 + 182 * 0.35 - 8 < left < right < 400 + 269 * 0.35 + 8 and 150 < top < bottom < 150 + 174 * 0.35 + 8
    assert body["result"] == face["result"] != whole["result"]  # the face crop was scored, not the photo
    coffee = encode(skdata.coffee(), "JPEG", quality=90)
    plain = client.post("/predict", json={"image": b64(coffee)}).json()["result"]
    none_found = client.post("/predict?faces=true", files={"image": ("coffee.jpg", coffee, "image/jpeg")}).json()
    assert none_found["faces_found"] == 0 and none_found["faces"] == [] and none_found["result"] == pytest.approx(plain)


def test_explain_and_batch_with_faces(client, small_face):
    explained = client.post("/explain?faces=true", files={"image": ("p.jpg", small_face, "image/jpeg")}).json()
    assert explained["heatmap_of"] == "face 0" and explained["heatmap"].startswith("data:image/png;base64,")
    assert explained["faces_found"] == 1 and (explained["width"], explained["height"]) == (640, 427)
    assert "verdict" in explained
    batch = client.post("/predict/batch?faces=true", json={"images": [b64(small_face), b64(b"not an image")]}).json()
    assert batch["count"] == 2 and batch["errors"] == 1
    assert batch["results"][0]["faces_found"] == 1 and batch["results"][1]["status"] == 422
    health = client.get("/health").json()
    assert health["faces"]["max_faces"] == 8 and health["queue"]["max_queue"] == 64


def test_too_many_faces_is_a_422_and_the_server_default_can_be_overridden(predictor, small_face):
    two_faces = np.concatenate([skdata.astronaut()[:300, 100:400]] * 2, axis=1)
    strict = TestClient(create_app(predictor, faces=FaceServing(True, FaceOptions(rule="mean"), max_faces=1)),
                        raise_server_exceptions=False)
    response = strict.post("/predict", json={"image": b64(encode(two_faces))})
    assert response.status_code == 422 and "2 faces found" in response.json()["error"]
    assert strict.post("/predict?faces=false", json={"image": b64(encode(two_faces))}).status_code == 200
    body = strict.post("/predict", json={"image": b64(small_face)}).json()  # faces on by default here
    assert body["faces_found"] == 1 and body["face_rule"] == "mean"
    with pytest.raises(ValueError, match="max_faces"):
        FaceServing(max_faces=0)
    with pytest.raises(ValueError, match="rule"):
        ServeSettings(face_rule="median")


def test_a_full_queue_answers_503_with_retry_after_and_recovers(predictor):
    app = create_app(predictor, max_queue=2)
    client = TestClient(app, raise_server_exceptions=False)
    worker = app.state.served.worker
    image = b64(encode(skdata.chelsea()))
    release = threading.Event()
    blocker = worker.submit_call(lambda: release.wait(30))  # the model thread is busy
    waiting = worker.submit_scores([predictor.load_tensor(skdata.coffee())])  # the queue holds 2 of 2
    response = client.post("/predict", json={"image": image})
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert "busy" in response.json()["error"]
    assert client.get("/health").json()["queue"] == {"queued": 2, "max_queue": 2, "refused": 1}
    release.set()
    blocker.result(10)
    waiting[0].result(10)
    assert client.post("/predict", json={"image": image}).status_code == 200
    assert worker.queued == 0


def test_dfd_serve_without_weights_serves_the_newest_run(tmp_path, monkeypatch, caplog):
    """`make demo` then `make serve`: the demo run's mixture, said in the log; a fresh clone: the way out."""
    import uvicorn
    from test_predict_stream import make_run

    from dfd_lib.cli import main as dfd_main
    from dfd_lib.scoring import default_weights

    reports = tmp_path / "reports"
    demo = make_run(reports, "demo", make_tiny_weights(tmp_path / "trained"), 2_000_000)
    monkeypatch.setattr(default_weights, "DEFAULT_WEIGHTS_DIR", tmp_path / "weights" / "moe")
    monkeypatch.setattr(default_weights, "REPORTS_DIR", reports)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    with caplog.at_level("INFO"):
        assert dfd_main(["serve", "--port", "8765"]) == 0
    assert str(demo) in caplog.text and "most recent run" in caplog.text
    assert TestClient(served["app"]).post("/predict", json={"image": b64(encode(skdata.chelsea()))}).status_code == 200
    monkeypatch.setattr(default_weights, "REPORTS_DIR", tmp_path / "fresh_clone")
    assert dfd_main(["serve"]) == 2
    assert "make demo" in caplog.text and "convert-weights" in caplog.text
