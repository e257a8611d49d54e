"""End to end: the Procfile's gunicorn command as a subprocess, spoken to over HTTP."""

from __future__ import annotations

import time

import requests

from tests.samples import as_paper, encode, sample
from tools.services import LiveServer


def test_predicts_over_http(live_server: LiveServer) -> None:
    data = encode(as_paper(sample(9)))
    response = requests.post(
        f"{live_server.url}/predict",
        files={"file": ("nine.png", data, "image/png")},
        headers={"x-api-key": live_server.api_key, "X-Request-ID": "e2e-1"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "e2e-1"
    assert response.json()["prediccion"] == 9


def test_public_routes_over_http(live_server: LiveServer) -> None:
    assert requests.get(f"{live_server.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{live_server.url}/readyz", timeout=5).status_code == 200
    assert requests.get(f"{live_server.url}/", timeout=5).status_code == 200
    assert "paths" in requests.get(f"{live_server.url}/openapi.json", timeout=5).json()


def test_each_worker_loads_the_model_after_the_fork(live_server: LiveServer) -> None:
    deadline = time.monotonic() + 20  # /readyz answered once the first worker was ready
    pids: set[int] = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        pids = live_server.worker_pids()
        time.sleep(0.1)
    assert len(pids) == 2  # WEB_CONCURRENCY=2: one load per worker ...
    assert live_server.process.pid not in pids  # ... and none in the master


def test_body_over_the_limit_through_gunicorn(live_server: LiveServer) -> None:
    body = b"\0" * (10 * 1024 * 1024 + 1)
    response = requests.post(
        f"{live_server.url}/predict",
        data=body,
        headers={"x-api-key": live_server.api_key, "Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_request_log_lines_are_json(live_server: LiveServer) -> None:
    requests.get(f"{live_server.url}/healthz", headers={"X-Request-ID": "log-check"}, timeout=5)
    lines = [r for r in live_server.records() if r.get("request_id") == "log-check"]
    assert lines and lines[-1]["route"] == "/healthz" and lines[-1]["status"] == 200
    assert live_server.api_key not in live_server.log()
