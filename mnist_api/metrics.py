"""Every Prometheus metric of the service, defined once (`/metrics` itself: http/http_metrics.py).

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

from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

# The HTTP metrics keep the names (and labels) prometheus-flask-exporter gave them, which the
# dashboard and the alerts query; the app records them itself, in one hook per request.
HTTP_SECONDS = Histogram(
    "flask_http_request_duration_seconds",
    "Flask HTTP request duration in seconds",
    ["method", "url_rule", "status"],
    registry=None,
)
HTTP_REQUESTS = Counter(
    "flask_http_request_total",
    "Total number of HTTP requests",
    ["method", "status"],
    registry=None,
)
# Label values come from fixed sets, so no client can add series by inventing a method or a
# path: other methods, and requests that matched no route, are counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
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
    "Answered predictions by predicted digit and answering version (cache hits included).",
    ["digit", "model_version"],
    registry=None,
)
CONFIDENCE = Histogram(
    "mnist_prediction_confidence",
    "Top probability of each answered prediction, by answering version.",
    ["model_version"],
    buckets=(0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0),
    registry=None,
)
LOW_CONFIDENCE = Counter(
    "mnist_low_confidence_predictions",
    "Answers whose top probability is below LOW_CONFIDENCE_THRESHOLD, by answering version.",
    ["model_version"],
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
    "1 for the stable model version of this service (0: an earlier stable, until restart).",
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

ANSWER_SECONDS = Histogram(
    "mnist_answer_seconds",
    "Latency of requests answered by a model version (whole request; cache hits included).",
    ["model_version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=None,
)
DEPLOYMENT_INFO = Gauge(
    "mnist_deployment_info",
    "1 for the deployment in force (strategy, stable and candidate versions); an earlier "
    "deployment's label set stays at 0 until its worker exits: select == 1.",
    ["id", "strategy", "stable", "candidate"],
    multiprocess_mode="livemax",
    registry=None,
)
GUARD_ROLLBACKS = Counter(
    "mnist_guard_rollbacks",
    "Candidates the guard rolled back by itself, by the signal that was worse.",
    ["signal"],
    registry=None,
)
AUTO_PROMOTIONS = Counter(
    "mnist_auto_promotions",
    "Candidates promoted by themselves on feedback (AUTO_PROMOTE=1).",
    registry=None,
)
GUARD_SIGNALS = ("low_confidence", "errors", "accuracy")
FEEDBACK = Counter(
    "mnist_feedback",
    "Feedback received (POST /feedback, first label per key, image and version), by whether "
    "the version's answer was right.",
    ["model_version", "correct"],
    registry=None,
)

ALL = (
    HTTP_SECONDS,
    HTTP_REQUESTS,
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
    ANSWER_SECONDS,
    DEPLOYMENT_INFO,
    GUARD_ROLLBACKS,
    AUTO_PROMOTIONS,
    FEEDBACK,
)


def record_answers(answers: Sequence[dict[str, Any]], low_confidence_threshold: float) -> None:
    """Count answered predictions by digit and confidence."""
    for answer in answers:
        confidence = float(answer["probabilidad"])
        version = str(answer.get("model_version", ""))
        PREDICTIONS.labels(digit=str(answer["prediccion"]), model_version=version).inc()
        CONFIDENCE.labels(model_version=version).observe(confidence)
        if confidence < low_confidence_threshold:
            LOW_CONFIDENCE.labels(model_version=version).inc()


def record_shadow(stable: str, candidate: str, agreements: Sequence[bool]) -> None:
    """Count shadow-scored inputs by whether the candidate's digit matched stable's."""
    agreed = sum(agreements)
    if agreed:
        SHADOW_PREDICTIONS.labels(stable=stable, candidate=candidate, agree="true").inc(agreed)
    if len(agreements) - agreed:
        SHADOW_PREDICTIONS.labels(stable=stable, candidate=candidate, agree="false").inc(
            len(agreements) - agreed
        )


def prepare_versions(model_versions: Sequence[str]) -> None:
    """Create every installed version's per-version series at 0, so a fresh /metrics (and
    the dashboard) has them before the first answer; also the guard's counters."""
    for version in model_versions:
        ANSWER_SECONDS.labels(model_version=version)
        CONFIDENCE.labels(model_version=version)
        LOW_CONFIDENCE.labels(model_version=version)
        for other in model_versions:
            if other != version:  # every pair a shadow could score
                for agree in ("true", "false"):
                    SHADOW_PREDICTIONS.labels(stable=version, candidate=other, agree=agree)
    for signal in GUARD_SIGNALS:
        GUARD_ROLLBACKS.labels(signal=signal)
    AUTO_PROMOTIONS.inc(0)


_deployment_labels: dict[str, str] = {}


def set_deployment(deployment_id: str, strategy: str, stable: str, candidate: str) -> None:
    """Publish the deployment in force; the previous label set goes to 0 (in multiprocess
    mode a sample cannot be deleted from the worker's file, only overwritten)."""
    labels = {"id": deployment_id, "strategy": strategy, "stable": stable, "candidate": candidate}
    if _deployment_labels and _deployment_labels != labels:
        DEPLOYMENT_INFO.labels(**_deployment_labels).set(0)
        DEPLOYMENT_INFO.remove(*_deployment_labels.values())
    DEPLOYMENT_INFO.labels(**labels).set(1)
    _deployment_labels.clear()
    _deployment_labels.update(labels)


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


_model_version: list[str] = []


def set_model_version(model_version: str) -> None:
    """Publish which model is stable in this process; an earlier stable's series goes to 0
    (select `mnist_model_info == 1`)."""
    if _model_version and _model_version[0] != model_version:
        MODEL_INFO.labels(model_version=_model_version[0]).set(0)
        MODEL_INFO.remove(_model_version[0])
    MODEL_INFO.labels(model_version=model_version).set(1)
    _model_version[:] = [model_version]


def http_method_label(method: str) -> str:
    """The method as a label: one of HTTP_METHODS, else "other"."""
    return method if method in HTTP_METHODS else OTHER


def http_status_label(status: int) -> str:
    """The status code as a label: a real HTTP status (100..599), else "other"."""
    return str(status) if 100 <= status <= 599 else OTHER


def process_registry() -> CollectorRegistry:
    """Every metric in one registry of this process (no PROMETHEUS_MULTIPROC_DIR)."""
    registry = CollectorRegistry()
    for metric in ALL:
        registry.register(metric)
    return registry
