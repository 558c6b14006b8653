"""What a server on the internet's front door exposes: the bearer token (compared in constant
time, read from the environment, a warning when it is on the command line), which paths answer
without it, that no request field is ever opened as a file, and that error answers quote at most
a bounded prefix of what a client sent. docs/serving.md, "Security model", says why."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from skimage import data as skdata
from starlette.routing import Mount
from test_serve import b64, encode, free_port, make_tiny_weights

from dfd_lib.cli import main as dfd_main
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import create_app
from dfd_lib.serving.cli import TOKEN_ENV
from dfd_lib.serving.request_parsing import MAX_ERROR_CHARS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "exposure-token-4f1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Answer without the token: the page and its static files (a browser cannot send a bearer header when it
# loads a page), /health (liveness for load balancers), and the API's description (the same for every
# dfd-kit server; clients learn from it that a token is needed). None of them runs the model.
PUBLIC = {"/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/static"}
SMALL = 1024  # bytes: the largest error answer any request below may get


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def guarded(weights) -> TestClient:
    predictor = Predictor.load(weights, batch_size=4, malloc_tuning=False)
    return TestClient(create_app(predictor, token=TOKEN), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def photo() -> bytes:
    return encode(skdata.astronaut()[::8, ::8])


def _routes(routes) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves; a mount as its prefix with GET."""
    out = []
    for route in routes:
        if hasattr(route, "original_router"):  # an included router (the app's routes carry no prefix)
            out += _routes(route.original_router.routes)
        elif isinstance(route, Mount):
            out.append(("GET", route.path))
        else:
            out += [(method, route.path) for method in sorted(route.methods) if method != "HEAD"]
    return out


def test_every_endpoint_but_the_public_ones_needs_the_token(guarded, photo):
    routes = _routes(guarded.app.routes)
    protected = [(m, p) for m, p in routes if p not in PUBLIC]
    assert {("POST", "/predict"), ("POST", "/predict/batch"), ("POST", "/explain")} <= set(protected)
    assert {p for _, p in routes} - {p for _, p in protected} == PUBLIC  # nothing public that is not listed
    body = {"image": b64(photo), "images": [b64(photo)]}  # what /predict, /explain and /predict/batch read
    for method, path in protected:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            response = guarded.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.content[:200])
            assert response.headers["www-authenticate"] == "Bearer"
        assert guarded.request(method, path, json=body, headers=AUTH).status_code == 200, (method, path)
    for method, path in routes:
        if path in PUBLIC:
            url = "/static/app.js" if path == "/static" else path
            assert guarded.request(method, url).status_code == 200, (method, url)


def test_the_token_is_compared_in_constant_time(guarded, photo, monkeypatch):
    compared, real = [], secrets.compare_digest
    monkeypatch.setattr(secrets, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert guarded.post("/predict", json={"image": b64(photo)}, headers={"Authorization": "Bearer guess"}).status_code == 401
    assert guarded.post("/predict", json={"image": b64(photo)}, headers=AUTH).status_code == 200
    assert compared == [(b"guess", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_a_token_on_the_command_line_warns(tmp_path, capsys):
    assert dfd_main(["serve", "--weights", str(tmp_path / "none"), "--token", "visible"]) == 2
    err = capsys.readouterr().err
    assert "visible to every user" in err and TOKEN_ENV in err


@pytest.mark.slow
def test_dfd_serve_takes_its_token_from_the_environment(weights, tmp_path):
    port = free_port()
    env = {**os.environ, TOKEN_ENV: TOKEN, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dfd_lib.cli", "serve", "--weights", str(weights), "--port", str(port), "--threads", "1"]
    log = tmp_path / "serve.log"
    server = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                health = requests.get(f"{url}/health", timeout=5).json()
                break
            except requests.ConnectionError:
                time.sleep(0.3)
        assert health["token_required"] is True
        assert TOKEN not in Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")  # not in `ps`
        image = {"image": b64(encode(skdata.camera()[::8, ::8]))}
        assert requests.post(f"{url}/predict", json=image, timeout=30).status_code == 401
        assert requests.post(f"{url}/predict", json=image, headers=AUTH, timeout=30).status_code == 200
    finally:
        server.terminate()
        server.wait(15)
    assert "visible to every user" not in log.read_text()


def test_no_request_field_is_opened_as_a_file(guarded, photo, tmp_path):
    """A path on this machine that holds a real image: had the server opened it, it would answer 200."""
    on_disk = tmp_path / "photo.png"
    on_disk.write_bytes(photo)
    as_path, as_url = str(on_disk), on_disk.as_uri()
    cases = {
        "JSON image: a path": guarded.post("/predict", json={"image": as_path}, headers=AUTH),
        "JSON image: a file URL": guarded.post("/predict", json={"image": as_url}, headers=AUTH),
        "JSON field 'path'": guarded.post("/predict", json={"path": as_path}, headers=AUTH),
        "multipart filename, other content": guarded.post("/predict", files={"image": (as_path, b"not an image", "image/png")},
                                                          headers=AUTH),
        "multipart filename, no content": guarded.post("/predict", files={"image": (as_path, b"", "image/png")}, headers=AUTH),
        "multipart field holding a path": guarded.post("/predict", data={"image": as_path},
                                                       files={"other": ("x", b"1")}, headers=AUTH),
        "batch of paths": guarded.post("/predict/batch", json={"images": [as_path, as_url]}, headers=AUTH),
    }
    for name, response in cases.items():
        if name.startswith("batch"):
            assert all("error" in item for item in response.json()["results"]), (name, response.content)
        else:
            assert 400 <= response.status_code < 500, (name, response.status_code, response.content[:200])
    # the content itself is what is scored, whatever the file name says
    named = guarded.post("/predict", files={"image": ("/etc/passwd", photo, "text/plain")}, headers=AUTH)
    assert named.status_code == 200
    # the static files stay inside their folder
    source = (PROJECT_ROOT / "dfd_lib" / "serving" / "app.py").read_text()[:200]
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fpaths.py",
                 "/static//etc/passwd", "/static/" + as_path):
        response = guarded.get(path)
        assert response.status_code == 404 and source not in response.text and "root:" not in response.text, path


def test_errors_quote_at_most_a_bounded_prefix_of_the_request(guarded):
    garbage = "!<garbage>" * 100_000  # 1 MB of text that is no base64, no image, no name
    cases = {
        "huge invalid base64": dict(method="POST", url="/predict", json={"image": garbage}),
        "huge field name": dict(method="POST", url="/predict", json={garbage: 1, "other" + garbage: 2}),
        "huge data URL header": dict(method="POST", url="/predict", json={"image": "data:" + garbage}),
        "huge unterminated JSON": dict(method="POST", url="/predict", content=b'{"image": "' + garbage.encode(),
                                       headers={"content-type": "application/json"}),
        "huge content type": dict(method="POST", url="/predict", content=b"{}", headers={"content-type": "x/" + garbage[:60_000]}),
        "huge multipart field name": dict(method="POST", url="/predict", files={garbage[:50_000]: ("a.png", b"x", "image/png")}),
        "huge path": dict(method="GET", url="/" + "a" * 60_000),
        "huge expert number": dict(method="POST", url="/explain?expert=" + "9" * 4000, json={"image": "x"}),
        "huge Content-Length": dict(method="POST", url="/predict", content=b"{}",
                                    headers={"content-type": "application/json", "content-length": "9" * 5000}),
        "huge batch item": dict(method="POST", url="/predict/batch", json={"images": [garbage, "data:" + garbage]}),
    }
    for name, kwargs in cases.items():
        headers = {**AUTH, **kwargs.pop("headers", {})}
        response = guarded.request(**kwargs, headers=headers)
        assert response.status_code < 500, (name, response.status_code, response.content[:300])
        assert len(response.content) <= SMALL, (name, len(response.content), response.content[:300])
        body = response.json()
        messages = [item["error"] for item in body["results"]] if "results" in body else [body["error"]]
        assert all(len(message) <= MAX_ERROR_CHARS + 40 for message in messages), (name, messages)
        assert "<garbage>" * 8 not in response.text and "a" * 100 not in response.text, (name, response.text[:300])
