"""The HTTP API: the original contract byte for byte, every malformed request answered with a
4xx JSON error while the server keeps serving, limits, the token, batching under concurrency,
and the real server (uvicorn) answering a client written for the original Flask server."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as skdata

from dfd_lib.cli import main as dfd_main
from dfd_lib.data.images import load_rgb
from dfd_lib.models.checkpoints import MixtureConfig, save_mixture
from dfd_lib.models.experts import build_mixture
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import create_app
from dfd_lib.serving.worker import ModelWorker

TINY = ["test_efficientnet", "test_efficientnet"]
SIZE = 64
BODY_LIMIT = 4 * 1024 * 1024


def make_tiny_weights(directory: Path, seed: int = 0, localisation_head: str = "") -> Path:
    """A 2-expert mixture at 64 px in our format, with heads scaled so images score apart;
    ``localisation_head`` ("light", "linear"): untrained localisation heads too, so it has maps."""
    torch.manual_seed(seed)
    model = build_mixture(TINY, localisation_head=localisation_head or None)
    with torch.no_grad():
        for expert in model.experts:
            expert.baseline_extractor.get_classifier().weight.mul_(40.0)
    config = MixtureConfig(backbones=TINY, image_size=SIZE, preprocess="default", localisation_head=localisation_head)
    return save_mixture(model, directory, config)


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width`` x ``height`` RGB pixels but whose
    data holds one row: what a decompression bomb looks like from its header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def predictor(weights) -> Predictor:
    return Predictor.load(weights, batch_size=4, malloc_tuning=False)


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor, max_body_bytes=BODY_LIMIT), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    astronaut = skdata.astronaut()
    return {
        "astronaut.jpg": encode(astronaut, "JPEG", quality=90),
        "chelsea.png": encode(skdata.chelsea()),
        "coffee.jpg": encode(skdata.coffee(), "JPEG", quality=85),
    }


def assert_json_error(response, status: int | None = None) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:200])
    if status is not None:
        assert response.status_code == status, response.content
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and len(body["error"]) > 8
    return body["error"]


# --------------------------------------------------------------------------- the original contract


def test_predict_answers_the_original_contract_byte_for_byte(client, predictor, photos):
    raw = photos["astronaut.jpg"]
    response = client.post("/predict", json={"image": b64(raw)})
    expected = predictor.predict_one(raw).prob
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"  # what Flask's jsonify sends
    # Flask's jsonify outside debug mode: compact separators, sorted keys, trailing newline
    assert response.content == (json.dumps({"result": expected}, separators=(",", ":")) + "\n").encode()
    assert response.json()["result"] == expected
    assert 0.0 <= expected <= 1.0


@pytest.mark.slow
def test_data_url_multipart_and_wrapped_base64_give_the_same_score(client, photos):
    raw = photos["chelsea.png"]
    reference = client.post("/predict", json={"image": b64(raw)}).json()["result"]
    wrapped = "\n".join(b64(raw)[i : i + 76] for i in range(0, len(b64(raw)), 76))  # base64 tool output
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    variants = [
        client.post("/predict", json={"image": f"data:image/png;base64,{b64(raw)}"}),
        client.post("/predict", files={"image": ("chelsea.png", raw, "image/png")}),
        client.post("/predict", data={"image": b64(raw)}, files={"other": ("x", b"1")}),
        client.post("/predict", json={"image": wrapped}),
        client.post("/predict", json={"image": urlsafe}),
        client.post("/predict", content=json.dumps({"image": b64(raw)}).encode()),  # no content type
    ]
    for response in variants:
        assert response.status_code == 200, response.content
        assert response.json() == {"result": reference}


def test_images_score_apart(client, photos):
    scores = [client.post("/predict", json={"image": b64(raw)}).json()["result"] for raw in photos.values()]
    assert np.ptp(scores) > 1e-3  # a server answering a constant would fail here


def test_details_and_batch_report_each_expert(client, predictor, photos):
    raw = photos["coffee.jpg"]
    expected = predictor.predict_one(raw)
    details = client.post("/predict?details=true", json={"image": b64(raw)}).json()
    assert details["result"] == expected.prob and details["experts"] == pytest.approx(expected.expert_probs, abs=1e-6)
    batch = client.post("/predict/batch", json={"images": [b64(raw), "###", b64(b"text, not an image"), b64(photos["chelsea.png"])]})
    assert batch.status_code == 200
    body = batch.json()
    assert body["count"] == 4 and body["errors"] == 2
    first, bad64, notimage, last = body["results"]
    assert first["result"] == pytest.approx(expected.prob, abs=1e-6) and len(first["experts"]) == 2
    assert bad64["status"] == 400 and "base64" in bad64["error"]
    assert notimage["status"] == 422 and "not an image" in notimage["error"]
    assert last["result"] == pytest.approx(predictor.predict_one(photos["chelsea.png"]).prob, abs=1e-6)
    files = [("images", (name, raw, "application/octet-stream")) for name, raw in photos.items()]
    multipart = client.post("/predict/batch", files=files).json()
    assert multipart["errors"] == 0 and [r["index"] for r in multipart["results"]] == [0, 1, 2]


def test_explain_returns_scores_and_a_png_heatmap(client, photos):
    raw = photos["astronaut.jpg"]
    plain = client.post("/predict", json={"image": b64(raw)}).json()["result"]
    body = client.post("/explain", files={"image": ("a.jpg", raw, "image/jpeg")}).json()
    assert body["result"] == plain and len(body["experts"]) == 2 and body["backbones"] == TINY
    assert body["heatmap"].startswith("data:image/png;base64,")
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap"].split(",", 1)[1])))
    assert heatmap.format == "PNG" and heatmap.size == (512, 512)
    one = client.post("/explain?expert=1", json={"image": b64(raw)})
    assert one.status_code == 200
    assert assert_json_error(client.post("/explain?expert=2", json={"image": b64(raw)}), 400).startswith("expert 2")


def test_health_schema_and_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"]["experts"] == 2 and health["token_required"] is False
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/explain", "/health"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert client.get("/static/app.js").status_code == 200


# --------------------------------------------------------------------------- malformed requests


def malformed_requests(photos) -> dict[str, tuple[dict, int, str]]:
    """name -> (request kwargs for client.post('/predict'), status, words in the message)."""
    jpeg = photos["astronaut.jpg"]
    png = photos["chelsea.png"]
    small_bomb = encode(np.zeros((6000, 6000), np.uint8))  # 36 M pixels in ~40 kB: over the 25 M limit
    return {
        "invalid JSON": (dict(content=b'{"image": ', headers={"content-type": "application/json"}), 400, "invalid JSON"),
        "empty body": (dict(content=b"", headers={"content-type": "application/json"}), 400, "empty request body"),
        "JSON list": (dict(json=[b64(jpeg)]), 400, "must be an object"),
        "wrong field name": (dict(json={"img": b64(jpeg)}), 400, "missing field 'image'"),
        "null image": (dict(json={"image": None}), 400, "null"),
        "number image": (dict(json={"image": 42}), 400, "base64 string"),
        "empty image string": (dict(json={"image": ""}), 400, "empty"),
        "bad base64": (dict(json={"image": "this is *not* base64!"}), 400, "not valid base64"),
        "impossible base64 length": (dict(json={"image": "abcde"}), 400, "not valid base64"),
        "not UTF-8": (dict(content=b'{"image": "\xff\xfe"}', headers={"content-type": "application/json"}), 400, "UTF-8"),
        "nested too deeply": (dict(content=b"[" * 100_000, headers={"content-type": "application/json"}), 400, "invalid JSON"),
        "data URL not base64": (dict(json={"image": "data:image/png,abc"}), 400, "not base64"),
        "data URL without comma": (dict(json={"image": "data:image/png;base64"}), 400, "malformed data URL"),
        "not an image": (dict(json={"image": b64(b"plain text, no pixels " * 10)}), 422, "not an image"),
        "PDF bytes": (dict(files={"image": ("x.pdf", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n", "application/pdf")}), 422, "not an image"),
        "unsupported format (ICO)": (dict(json={"image": b64(encode(skdata.astronaut(), "ICO"))}), 422, "not an image"),
        "truncated JPEG": (dict(json={"image": b64(jpeg[: len(jpeg) // 2])}), 422, "truncated"),
        "truncated PNG": (dict(json={"image": b64(png[: len(png) // 2])}), 422, "truncated"),
        "1x1 image": (dict(json={"image": b64(encode(np.zeros((1, 1, 3), np.uint8)))}), 422, "too small"),
        "decompression bomb": (dict(json={"image": b64(png_claiming(30_000, 30_000))}), 413, "too large"),
        "over the pixel limit": (dict(json={"image": b64(small_bomb)}), 413, "exceeds the limit"),
        "50 MB body": (dict(content=b"x" * (50 * 1024 * 1024), headers={"content-type": "application/json"}), 413, "exceeds the limit"),
        "chunked body over the limit": (dict(content=iter([b'{"image": "'] + [b"A" * 65536] * 80),
                                             headers={"content-type": "application/json"}), 413, "exceeds the limit"),
        "text/plain": (dict(content=b64(jpeg).encode(), headers={"content-type": "text/plain"}), 415, "unsupported content type"),
        "form-urlencoded": (dict(data={"image": b64(jpeg)}), 415, "unsupported content type"),
        "multipart wrong field": (dict(files={"file": ("a.jpg", jpeg, "image/jpeg")}), 400, "missing form field 'image'"),
        "multipart empty file": (dict(files={"image": ("a.jpg", b"", "image/jpeg")}), 400, "empty"),
        "multipart garbage": (dict(content=b"--xyz\r\nnot a part",
                                   headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "multipart"),
    }


def test_every_malformed_request_gets_a_4xx_json_error_and_the_server_keeps_serving(client, photos):
    cases = malformed_requests(photos)
    assert len(cases) >= 20
    for name, (kwargs, status, words) in cases.items():
        response = client.post("/predict", **kwargs)
        assert response.status_code == status, (name, response.content[:300])
        message = assert_json_error(response, status)
        assert words.lower() in message.lower(), (name, message)
    assert client.post("/predict", json={"image": b64(photos["astronaut.jpg"])}).status_code == 200


def test_routing_and_batch_errors_are_json_too(client, photos):
    assert "no such endpoint" in assert_json_error(client.get("/nothing"), 404)
    assert "not allowed" in assert_json_error(client.get("/predict"), 405)
    assert "list" in assert_json_error(client.post("/predict/batch", json={"images": b64(photos["chelsea.png"])}), 400)
    assert "empty list" in assert_json_error(client.post("/predict/batch", json={"images": []}), 400)
    assert "limit is 32" in assert_json_error(client.post("/predict/batch", json={"images": ["x"] * 33}), 413)
    assert "missing field 'images'" in assert_json_error(client.post("/predict/batch", json={"image": "x"}), 400)
    assert "greater than or equal" in assert_json_error(client.post("/explain?expert=-1", json={"image": "x"}), 400)


# --------------------------------------------------------------------------- odd but valid images


def odd_images() -> dict[str, tuple[bytes, np.ndarray | None, int]]:
    """Encoded images in unusual modes -> (bytes, the RGB pixels they show, largest error
    allowed: JPEG rounding for JPEGs, none beyond 16->8 bit rounding for PNGs)."""
    rgb = skdata.coffee()[:200, :300]
    camera = skdata.camera()[:128, :160]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    ok, png48 = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    assert ok
    return {
        "CMYK JPEG": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb, 16),
        "16-bit greyscale PNG": (encode(Image.fromarray(camera.astype(np.uint16) * 257)), np.dstack([camera] * 3), 1),
        "48-bit RGB PNG": (png48.tobytes(), rgb, 1),
        "RGBA PNG (opaque)": (encode(rgba), rgb, 0),
        "greyscale JPEG": (encode(camera, "JPEG", quality=95), None, 0),
    }


def test_odd_but_valid_images_are_decoded_and_scored(client, predictor):
    """CMYK, 16-bit and RGBA images are valid images: the kit decodes every mode to RGB
    (dfd_lib.data.images), so the server scores them (200) — as the pixels they show."""
    for name, (raw, expected_rgb, max_error) in odd_images().items():
        response = client.post("/predict", json={"image": b64(raw)})
        assert response.status_code == 200, (name, response.content)
        assert response.json()["result"] == predictor.predict_one(load_rgb(raw)).prob, name
        if expected_rgb is not None:
            error = np.abs(np.asarray(load_rgb(raw), dtype=np.int16) - expected_rgb)
            assert error.max() <= max_error and error.mean() < 1.5, (name, error.max(), error.mean())


def test_strict_modes_refuse_unusual_colour_modes(predictor):
    strict = TestClient(create_app(predictor, strict_modes=True))
    images = odd_images()
    for name in ("CMYK JPEG", "16-bit greyscale PNG", "RGBA PNG (opaque)"):
        message = assert_json_error(strict.post("/predict", json={"image": b64(images[name][0])}), 422)
        assert "colour mode" in message, name
    assert strict.post("/predict", json={"image": b64(images["greyscale JPEG"][0])}).status_code == 200


# --------------------------------------------------------------------------- token


def test_bearer_token_guards_the_model_but_not_health(predictor, photos):
    guarded = TestClient(create_app(predictor, token="s3cret"))
    body = {"json": {"image": b64(photos["chelsea.png"])}}
    missing = guarded.post("/predict", **body)
    assert "missing bearer token" in assert_json_error(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "invalid bearer token" in assert_json_error(guarded.post("/predict", headers={"Authorization": "Bearer nope"}, **body), 401)
    assert guarded.post("/predict", headers={"Authorization": "Bearer s3cret"}, **body).status_code == 200
    assert guarded.get("/health").json()["token_required"] is True
    with pytest.raises(ValueError, match="must not be empty"):
        create_app(predictor, token="  ")


# --------------------------------------------------------------------------- sharing the model


def test_model_worker_batches_queued_images_and_survives_errors(predictor, photos):
    worker = ModelWorker(predictor, max_batch=8)
    try:
        gate = threading.Event()
        blocked = worker.submit_call(gate.wait)  # the model thread is busy: the next images queue up
        tensors = [predictor.load_tensor(raw) for raw in photos.values()] * 2
        futures = worker.submit_scores(tensors)
        gate.set()
        assert blocked.result(timeout=30) is True
        got = [f.result(timeout=30) for f in futures]
        assert worker.stats.batches == 1 and worker.stats.images == 6  # one forward for all six
        for tensor, (prob, experts) in zip(tensors, got):
            alone = predictor.predict_tensor(tensor[None])
            assert prob == pytest.approx(float(alone["prob"][0]), abs=1e-5) and len(experts) == 2
        failing = worker.submit_call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=30)
        assert worker.submit_scores(tensors[:1])[0].result(timeout=30)[0] == pytest.approx(got[0][0], abs=1e-6)
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="stopped"):
        worker.submit_scores(tensors[:1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(predictor):
    """The app on a real uvicorn server on a loopback port, in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_a_client_written_for_the_original_server_works_unchanged(live_server, predictor, photos):
    raw = photos["astronaut.jpg"]
    # the original client: requests + base64, reading ["result"]
    response = requests.post(f"{live_server}/predict", json={"image": base64.b64encode(raw).decode()}, timeout=30)
    assert response.json()["result"] == predictor.predict_one(raw).prob
    assert response.headers["content-type"] == "application/json"
    assert response.text.endswith("}\n") and '"result":' in response.text


def test_concurrent_clients_share_the_model_safely(live_server, predictor, photos):
    expected = {name: predictor.predict_one(raw).prob for name, raw in photos.items()}
    jobs = list(photos.items()) * 6

    def post(job):
        name, raw = job
        response = requests.post(f"{live_server}/predict", json={"image": b64(raw)}, timeout=60)
        return name, response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(post, jobs))
    for name, status, body in answers:
        assert status == 200 and body["result"] == pytest.approx(expected[name], abs=1e-5), (name, body)
    bad = requests.post(f"{live_server}/predict", data=b"{oops", headers={"content-type": "application/json"}, timeout=30)
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]
    assert requests.get(f"{live_server}/health", timeout=30).json()["served"]["images"] >= len(jobs)


# --------------------------------------------------------------------------- dfd serve


def test_dfd_serve_refuses_a_missing_weights_folder(tmp_path, capsys):
    assert dfd_main(["serve", "--weights", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    assert dfd_main(["serve", "--weights", str(tmp_path), "--workers", "0"]) == 2


def test_verdicts_carry_their_threshold_and_say_when_it_is_not_calibrated(predictor, photos):
    client = TestClient(create_app(predictor, max_body_bytes=BODY_LIMIT), raise_server_exceptions=False)
    info = client.get("/health").json()["threshold"]
    assert (info["value"], info["source"], info["calibrated"]) == (0.5, "not calibrated", False)
    assert "not calibrated" in info["note"]
    images = [b64(raw) for raw in photos.values()] + [b64(b"not an image at all, just text")]
    body = client.post("/predict/batch", json={"images": images}).json()
    assert (body["threshold"], body["threshold_source"]) == (0.5, "not calibrated")
    assert [r.get("verdict") for r in body["results"]] == [("fake" if r["result"] >= 0.5 else "real") for r in body["results"][:3]] + [None]
    explained = client.post("/explain", json={"image": images[0]}).json()
    assert explained["verdict"] == body["results"][0]["verdict"] and explained["threshold"] == 0.5
    # a given threshold wins over the mixture's (here: none) and says so
    given = TestClient(create_app(predictor, threshold=0.0))
    assert given.get("/health").json()["threshold"]["source"] == "given"
    assert given.post("/predict?details=true", json={"image": images[0]}).json()["verdict"] == "fake"


def test_dfd_serve_refuses_a_threshold_outside_0_1(tmp_path, capsys):
    assert dfd_main(["serve", "--weights", str(tmp_path), "--threshold", "1.5"]) == 2
    assert "--threshold must be in [0, 1]" in capsys.readouterr().err
