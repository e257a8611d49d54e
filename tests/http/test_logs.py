"""loguru is the only logger: JSON lines, stdlib routed in once, request ids, no secrets."""

from __future__ import annotations

import json
import logging

import pytest
import requests
from apiflask import APIFlask
from flask.testing import FlaskClient

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.extensions import SERVICE
from mnist_api.logs import configure_logging
from tests.samples import as_paper, encode, sample
from tools.services import LiveServer


@pytest.fixture
def json_app(settings: Settings) -> APIFlask:
    return create_app(settings.replace(log_format="json", log_level="INFO"))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_stdlib_logging_goes_through_loguru_once(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    logging.getLogger("werkzeug").warning("from werkzeug %s", 1)
    logging.getLogger("some.library").info("from a library")
    out, err = capfd.readouterr()
    lines = json_lines(out)
    assert [line["message"] for line in lines] == ["from werkzeug 1", "from a library"]
    assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == "werkzeug"
    assert err == ""
    assert len(out.strip().splitlines()) == 2  # nothing printed twice or in another format


def test_text_format_for_people(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    logging.getLogger("x").info("hello person")
    out, _ = capfd.readouterr()
    assert "hello person" in out and not out.startswith("{")
    configure_logging("WARNING", "text")
    logging.getLogger("x").info("hidden")
    assert "hidden" not in capfd.readouterr().out


def test_request_line_has_every_field(
    json_app: APIFlask, capfd: pytest.CaptureFixture[str], auth: dict[str, str]
) -> None:
    capfd.readouterr()
    response = json_app.test_client().post(
        "/predict",
        data=encode(as_paper(sample(7))),
        headers={**auth, "Content-Type": "image/png", "X-Request-ID": "req-42"},
    )
    out, _ = capfd.readouterr()
    line = [entry for entry in json_lines(out) if entry.get("route") == "/predict"][-1]
    body = response.get_json()
    assert line["request_id"] == "req-42"
    assert line["method"] == "POST" and line["status"] == 200
    assert isinstance(line["latency_ms"], float)
    assert line["cache"] == "MISS"
    assert line["digit"] == body["prediccion"]
    assert line["model_version"] == body["model_version"]
    assert len(line["key"]) == 8 and line["key"] not in auth["x-api-key"]
    assert auth["x-api-key"] not in out
    assert {"time", "level", "message"} <= set(line)


def test_request_line_has_the_shape_of_every_other_line(
    settings: Settings, capfd: pytest.CaptureFixture[str]
) -> None:
    """The request line skips loguru (its cost per call) but not the JSON line's shape or
    the level: same keys and time format as a loguru line, and none under LOG_LEVEL=WARNING."""
    client = create_app(settings.replace(log_format="json", log_level="INFO")).test_client()
    capfd.readouterr()
    client.get("/healthz")
    logging.getLogger("x").info("through loguru")
    lines = json_lines(capfd.readouterr().out)
    request_line = next(line for line in lines if line["message"] == "request")
    loguru_line = next(line for line in lines if line["message"] == "through loguru")
    assert list(request_line)[:4] == ["time", "level", "message", "pid"]
    assert request_line["pid"] == loguru_line["pid"] and request_line["level"] == "INFO"
    assert len(request_line["time"]) == len(loguru_line["time"])  # ISO 8601 with offset
    assert request_line["time"][-6] in "+-" and "T" in request_line["time"]
    quiet = create_app(settings.replace(log_format="json", log_level="WARNING")).test_client()
    capfd.readouterr()
    quiet.get("/healthz")
    assert not [line for line in json_lines(capfd.readouterr().out) if line["message"] == "request"]


def test_unexpected_error_logged_with_request_id_and_no_values(
    json_app: APIFlask,
    capfd: pytest.CaptureFixture[str],
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(data: bytes, **_options: object) -> dict:
        password = "hunter2-local-value"  # noqa: F841 - must never reach the logs
        raise RuntimeError("boom")

    monkeypatch.setattr(json_app.extensions[SERVICE], "predict", explode)
    capfd.readouterr()
    client: FlaskClient = json_app.test_client()
    response = client.post(
        "/predict",
        data=b"x",
        headers={**auth, "Content-Type": "image/png", "X-Request-ID": "req-err"},
    )
    assert response.status_code == 500
    out, _ = capfd.readouterr()
    errors = [entry for entry in json_lines(out) if entry["level"] == "ERROR"]
    assert errors and errors[0]["request_id"] == "req-err"
    assert "RuntimeError: boom" in errors[0]["exception"]
    assert "hunter2-local-value" not in out  # diagnose is off: no variable values


def test_gunicorn_stdout_is_only_json(live_server: LiveServer) -> None:
    requests.get(f"{live_server.url}/healthz", timeout=5)
    lines = [line for line in live_server.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)  # every stdout line is one JSON object
        assert {"time", "level", "message"} <= set(entry)
    assert any(entry.get("logger") == "gunicorn.error" for entry in map(json.loads, lines))
    # stderr holds nothing of ours, only LiteRT's native banner
    assert all("XNNPACK" in line for line in live_server.stderr().splitlines() if line.strip())
