"""Per-request bookkeeping: the `X-Request-ID` header and one log line per request."""

from __future__ import annotations

import re
import secrets
import time

from flask import Flask, Response, g, request

from mnist_api.logs import log_request, request_id_var

REQUEST_ID_HEADER = "X-Request-ID"
MODEL_VERSION_HEADER = "X-Model-Version"
_MAX_ID_LENGTH = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def client_identity() -> str:
    """The fingerprint of the caller's key (set by `mnist_api.http.auth`), or "" without one:
    what sticky deployments (A/B) hash, what prediction ids bind and feedback is stored under."""
    return str(g.get("api_key_fingerprint") or "")


def clean_request_id(raw: str | None) -> str:
    """The client's id made safe to echo and log (bounded, no control characters), or a new one."""
    cleaned = _UNSAFE.sub("", raw or "")[:_MAX_ID_LENGTH]
    return cleaned or secrets.token_hex(16)  # uuid4's 128 random bits, without the UUID object


def init_app(app: Flask) -> None:
    """Attach the request id to every request, response and log line."""

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        g.request_id = clean_request_id(request.headers.get(REQUEST_ID_HEADER))
        request_id_var.set(g.request_id)

    @app.after_request
    def _finish(response: Response) -> Response:
        request_id = g.get("request_id") or clean_request_id(None)
        response.headers[REQUEST_ID_HEADER] = request_id
        model_version = g.get("model_version")
        if model_version:
            # The version that really answered, for clients that read headers only.
            response.headers[MODEL_VERSION_HEADER] = model_version
        started = g.get("started")
        latency_ms = (time.perf_counter() - started) * 1000.0 if started else 0.0
        rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        log_request(
            request_id=request_id,
            method=request.method,
            route=rule,
            status=response.status_code,
            latency_ms=round(latency_ms, 2),
            cache=response.headers.get("X-Cache"),
            digit=g.get("digit"),
            model_version=g.get("model_version"),
            key=g.get("api_key_fingerprint"),
            code=g.get("error_code"),
        )
        return response

    @app.teardown_request
    def _forget(_exc: BaseException | None) -> None:
        request_id_var.set(None)
