"""Every Prometheus metric of the service, defined once, and `/metrics` on the app's own port.

Under gunicorn, `PROMETHEUS_MULTIPROC_DIR` is set before any worker imports
prometheus_client (gunicorn.conf.py), so each worker writes its samples to files in that
folder and `/metrics` sums them, whichever worker answers the scrape. Without it (a single
process, the tests) the same metric objects are served from an in-process registry.

The metric objects are module globals on purpose: prometheus_client keys its multiprocess
files by metric name, so one definition per process is the only correct shape. They are
not registered in the default registry, so building several apps in one test process never
raises "Duplicated timeseries".
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from mnist_api.errors import Unauthorized

_FAST_SECONDS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

INFERENCE_SECONDS = Histogram(
    "mnist_inference_seconds",
    "Time of one interpreter call (a single image or a whole batch).",
    ["model_version"],
    buckets=_FAST_SECONDS,
    registry=None,
)
PREPROCESS_SECONDS = Histogram(
    "mnist_preprocess_seconds",
    "Time to decode and normalise one upload.",
    buckets=_FAST_SECONDS,
    registry=None,
)
CACHE_LOOKUPS = Counter(
    "mnist_cache_lookups",
    "Prediction cache lookups by result: hit, miss, or error (Redis failed; served uncached).",
    ["result"],
    registry=None,
)
CACHE_DEGRADED = Gauge(
    "mnist_cache_degraded",
    "1 while the Redis cache is failing and predictions are served uncached.",
    multiprocess_mode="livemax",
    registry=None,
)
PREDICTIONS = Counter(
    "mnist_predictions",
    "Answered predictions by predicted digit (cache hits included).",
    ["digit"],
    registry=None,
)
CONFIDENCE = Histogram(
    "mnist_prediction_confidence",
    "Top probability of each answered prediction.",
    buckets=(0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0),
    registry=None,
)
LOW_CONFIDENCE = Counter(
    "mnist_low_confidence_predictions",
    "Answers whose top probability is below LOW_CONFIDENCE_THRESHOLD.",
    registry=None,
)
ERRORS = Counter(
    "mnist_errors",
    "Error responses by contract code.",
    ["code"],
    registry=None,
)
IN_FLIGHT = Gauge(
    "mnist_in_flight_requests",
    "Requests being served right now, summed over live workers.",
    multiprocess_mode="livesum",
    registry=None,
)
MODEL_INFO = Gauge(
    "mnist_model_info",
    "Always 1; the label says which model version this service runs.",
    ["model_version"],
    multiprocess_mode="livemax",
    registry=None,
)

SHADOW_PREDICTIONS = Counter(
    "mnist_shadow_predictions",
    "Requests scored in the shadow by the candidate, by whether it agreed with stable.",
    ["stable", "candidate", "agree"],
    registry=None,
)

FEEDBACK = Counter(
    "mnist_feedback",
    "Feedback received (POST /feedback, first label per key, image and version), by whether "
    "the version's answer was right.",
    ["model_version", "correct"],
    registry=None,
)

ALL = (
    INFERENCE_SECONDS,
    PREPROCESS_SECONDS,
    CACHE_LOOKUPS,
    CACHE_DEGRADED,
    PREDICTIONS,
    CONFIDENCE,
    LOW_CONFIDENCE,
    ERRORS,
    IN_FLIGHT,
    MODEL_INFO,
    SHADOW_PREDICTIONS,
    FEEDBACK,
)

View = TypeVar("View", bound=Callable[..., Any])


def record_answers(answers: Sequence[dict[str, Any]], low_confidence_threshold: float) -> None:
    """Count answered predictions by digit and confidence."""
    for answer in answers:
        confidence = float(answer["probabilidad"])
        PREDICTIONS.labels(digit=str(answer["prediccion"])).inc()
        CONFIDENCE.observe(confidence)
        if confidence < low_confidence_threshold:
            LOW_CONFIDENCE.inc()


def record_shadow(stable: str, candidate: str, agreements: Sequence[bool]) -> None:
    """Count shadow-scored inputs by whether the candidate's digit matched stable's."""
    agreed = sum(agreements)
    if agreed:
        SHADOW_PREDICTIONS.labels(stable=stable, candidate=candidate, agree="true").inc(agreed)
    if len(agreements) - agreed:
        SHADOW_PREDICTIONS.labels(stable=stable, candidate=candidate, agree="false").inc(
            len(agreements) - agreed
        )


def record_feedback(model_version: str, correct: bool) -> None:
    """Count one new feedback on `model_version`'s answer."""
    FEEDBACK.labels(model_version=model_version, correct=str(correct).lower()).inc()


def init_feedback(model_versions: Sequence[str]) -> None:
    """Create the feedback series at 0 for every installed version, so /metrics shows them
    (and rate() has a starting point) before the first feedback arrives."""
    for model_version in model_versions:
        for correct in ("true", "false"):
            FEEDBACK.labels(model_version=model_version, correct=correct)


def record_cache_lookups(result: str, count: int) -> None:
    """Count `count` cache lookups that ended as `result` (hit, miss, error)."""
    if count:
        CACHE_LOOKUPS.labels(result=result).inc(count)


def set_cache_degraded(degraded: bool) -> None:
    """Flag (or clear) a cache outage for dashboards and alerts."""
    CACHE_DEGRADED.set(1 if degraded else 0)


def _bearer_token_required(token: str) -> Callable[[View], View]:
    """Protect /metrics with `Authorization: Bearer <METRICS_TOKEN>`."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.encode(), token.encode()
            ):
                raise Unauthorized("Send the metrics token as 'Authorization: Bearer <token>'.")
            return view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate


def set_model_version(model_version: str) -> None:
    """Publish which model this process serves."""
    MODEL_INFO.labels(model_version=model_version).set(1)


def init_app(app: Flask, multiprocess: bool, token: str = "") -> None:
    """Serve /metrics, count HTTP requests per route, and track in-flight requests and errors."""
    options: dict[str, Any] = {"group_by": "url_rule", "excluded_paths": ["^/metrics$"]}
    if token:
        options["metrics_decorator"] = _bearer_token_required(token)
    if multiprocess:
        GunicornInternalPrometheusMetrics(app, **options)
    else:
        registry = CollectorRegistry()
        for metric in ALL:
            registry.register(metric)
        PrometheusMetrics(app, registry=registry, **options)
    # APIFlask would document this text endpoint as JSON; app.py documents it by hand.
    setattr(app.view_functions["prometheus_metrics"], "_spec", {"hide": True})  # noqa: B010

    @app.before_request
    def _enter() -> None:
        IN_FLIGHT.inc()
        g.in_flight = True

    @app.teardown_request
    def _leave(_exc: BaseException | None) -> None:
        if g.pop("in_flight", False):
            IN_FLIGHT.dec()
        code = g.get("error_code")
        if code:
            ERRORS.labels(code=code).inc()
