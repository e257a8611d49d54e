"""`/metrics` on the app's own port, and the HTTP metrics: one hook before and one after each
request. The metric objects themselves are defined once in `mnist_api.metrics`.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from mnist_api.http.auth import metrics_token_required
from mnist_api.metrics import (
    ANSWER_SECONDS,
    ERRORS,
    HTTP_REQUESTS,
    HTTP_SECONDS,
    IN_FLIGHT,
    OTHER,
    http_method_label,
    http_status_label,
    process_registry,
)


def init_app(app: Flask, multiprocess: bool, token: str = "") -> None:
    """Serve /metrics, count HTTP requests per route, and track in-flight requests and errors.

    One hook before and one after each request (the request's start time is request_context's
    `g.started`); the /metrics scrape itself is not counted.
    """
    registry = None if multiprocess else process_registry()

    def exposition() -> Response:
        # Multiprocess: a fresh collector per scrape reads every worker's files.
        scraped = registry
        if scraped is None:
            scraped = CollectorRegistry()
            MultiProcessCollector(scraped)  # type: ignore[no-untyped-call]
        return Response(generate_latest(scraped), mimetype=CONTENT_TYPE_LATEST)

    view = metrics_token_required(token)(exposition) if token else exposition
    app.add_url_rule("/metrics", "prometheus_metrics", view, methods=["GET"])

    @app.before_request
    def _enter() -> None:
        IN_FLIGHT.inc()
        g.in_flight = True

    @app.after_request
    def _count(response: Response) -> Response:
        rule = request.url_rule
        if rule is not None and rule.endpoint == "prometheus_metrics":
            return response
        status = http_status_label(response.status_code)
        method = http_method_label(request.method)
        started = g.get("started")
        seconds = time.perf_counter() - started if started is not None else 0.0
        HTTP_SECONDS.labels(method, str(rule) if rule is not None else OTHER, status).observe(
            seconds
        )
        HTTP_REQUESTS.labels(method, status).inc()
        code = g.get("error_code")
        if code:
            ERRORS.labels(code).inc()
        version = g.get("model_version")
        if version and code is None:
            ANSWER_SECONDS.labels(version).observe(seconds)
        return response

    @app.teardown_request
    def _leave(_exc: BaseException | None) -> None:
        if g.pop("in_flight", False):  # always, even if a response never got built
            IN_FLIGHT.dec()
