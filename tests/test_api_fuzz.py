"""Schema-driven fuzzing of the HTTP API: schemathesis reads the server's own OpenAPI schema
(``/openapi.json``) and generates requests for every endpoint in it — valid ones (the schema's
example image, random base64, random uploads, every query parameter) and invalid ones (wrong
types, missing fields, bad content types) — against a server started with a bearer token, once
with the token and once without. The property: no answer is a 5xx, every 4xx is JSON
``{"error": "<message>"}`` of bounded size, unauthenticated POSTs get 401, and ``/health``
answers afterwards.

Bounded and repeatable: hypothesis is derandomised, ``CASES`` cases per endpoint, generation mode
and token setting (``DFD_FUZZ_CASES`` to fuzz longer). The cases are the same every run for one
``PYTHONHASHSEED`` (some of schemathesis' choices follow set order, so the statuses' counts move by a
few between runs otherwise). ``pytest -s`` prints the cases per endpoint and their statuses."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_serve import make_tiny_weights

from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import create_app

TOKEN = "fuzz-token-0123456789"
BODY_LIMIT = 256 * 1024
CASES = int(os.environ.get("DFD_FUZZ_CASES", "30"))  # per endpoint, generation mode and token setting
FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
ENDPOINTS = ["GET /health", "POST /explain", "POST /predict", "POST /predict/batch"]
STATUSES: Counter = Counter()  # (endpoint, token setting, status) -> cases


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor.load(make_tiny_weights(tmp_path_factory.mktemp("moe")), batch_size=4, malloc_tuning=False)


@pytest.fixture
def app(predictor):
    """One app per test: schemathesis' pytest plugin ends every ASGI app's lifespan after each test,
    which stops the app's model worker (a real server runs one lifespan)."""
    return create_app(predictor, max_body_bytes=BODY_LIMIT, token=TOKEN, max_batch_images=4)


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operation(api_schema, endpoint: str):
    method, path = endpoint.split(" ", 1)
    return api_schema[path][method]


def _check(endpoint: str, token: str, response) -> None:
    STATUSES[(endpoint, token, response.status_code)] += 1
    authorised = "Authorization" in response.request.headers  # schemathesis leaves it out of some cases on purpose
    assert response.status_code < 500, (endpoint, response.status_code, response.content[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"] == ["application/json"], (endpoint, response.headers)
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and len(body["error"]) > 8, body
        assert len(response.content) < 2048, (endpoint, len(response.content))  # a bounded message
    if not authorised and endpoint.startswith("POST"):
        assert response.status_code == 401, (endpoint, response.status_code, response.content[:300])


def test_the_schema_lists_every_endpoint(api_schema):
    listed = sorted(f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations())
    assert listed == ENDPOINTS  # a new endpoint must be added to the fuzzing


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("token", ["with token", "without token"])
def test_fuzz_every_endpoint(app, api_schema, endpoint, token):
    operation = _operation(api_schema, endpoint)
    auth = {"Authorization": f"Bearer {TOKEN}"} if token == "with token" else {}
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])  # /health: nothing to break
    strategies = [operation.as_strategy(mode) for mode in modes]
    strategies += api_schema.get_strategies_from_examples(operation)  # the schema's example image

    for strategy in strategies:
        @FUZZ
        @given(case=strategy)
        def run(case):
            headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            case.headers = headers
            _check(endpoint, token, case.call(headers=auth))

        run()
    if token == "with token":  # the fuzzing reached the model, not only the request parsing
        assert STATUSES[(endpoint, token, 200)] > 0, endpoint
    health = TestClient(app).get("/health")  # the same app, after the fuzzing
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.fixture(scope="module", autouse=True)
def _report_statuses():
    yield
    for endpoint in ENDPOINTS:
        for token in ("with token", "without token"):
            counts = {status: n for (e, t, status), n in sorted(STATUSES.items()) if (e, t) == (endpoint, token)}
            print(f"{endpoint} {token}: {sum(counts.values())} cases, statuses {counts}")
