"""Marshmallow schemas: they document the API in /openapi.json and shape its answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from apiflask import Schema
from apiflask.fields import Boolean, Dict, File, Float, Integer, List, Nested, String
from apiflask.validators import Length, OneOf, Range
from marshmallow import INCLUDE

View = TypeVar("View", bound=Callable[..., Any])


def documents_upload(schema: type[Schema]) -> Callable[[View], View]:
    """Document a multipart request body in /openapi.json without parsing it per request.

    `@bp.input(..., location="files")` would also parse the form on every call; the views
    read the body themselves (multipart or raw), so only APIFlask's annotation is needed.
    """

    def annotate(view: View) -> View:
        spec = view.__dict__.setdefault("_spec", {})
        spec.update(
            body=schema(), body_example=None, body_examples=None, content_type="multipart/form-data"
        )
        return view

    return annotate


def documents_query(schema: type[Schema]) -> Callable[[View], View]:
    """Document query parameters in /openapi.json without parsing them per request.

    `@bp.input(..., location="query")` runs webargs on every call (5% of a cached answer's
    time) only to hand the view a dict it does not need: the views read the one optional
    parameter from `request.args` themselves.
    """

    def annotate(view: View) -> View:
        spec = view.__dict__.setdefault("_spec", {})
        spec.setdefault("args", []).append((schema(), "query"))
        return view

    return annotate


class Upload(Schema):
    """One image as multipart field `file` (a raw image body is documented beside it)."""

    class Meta:
        unknown = INCLUDE  # other form fields are ignored, not refused

    file = File(required=True, metadata={"description": "PNG, JPEG, GIF, WEBP or BMP image"})


class BatchUpload(Schema):
    """Several images as repeated multipart fields `files`."""

    class Meta:
        unknown = INCLUDE  # other form fields are ignored, not refused

    files = List(File(), required=True, metadata={"description": "one part per image"})


class Prediction(Schema):
    """The answer for one image."""

    prediccion = Integer(required=True, validate=Range(0, 9), metadata={"example": 7})
    probabilidad = Float(required=True, validate=Range(0, 1), metadata={"example": 0.9981})
    probabilities = List(
        Float(validate=Range(0, 1)),
        required=True,
        validate=Length(equal=10),
        metadata={"description": "probability of each digit 0-9; they sum to 1"},
    )
    model_version = String(required=True, metadata={"example": "mnist-cnn-int8-3f2a9c1b7d4e"})
    cached = Boolean(required=True, metadata={"description": "true when served from the cache"})
    prediction_id = String(
        metadata={
            "description": "signed id of this answer (version, deployment, key, input, time): "
            "send it with POST /feedback to judge the answer",
        }
    )


class CacheHeaders(Schema):
    """Response headers of /predict."""

    x_cache = String(data_key="X-Cache", metadata={"description": "HIT or MISS"})


class Error(Schema):
    """The one error shape of every route."""

    error = String(required=True, metadata={"description": "a sentence a person can act on"})
    code = String(required=True, metadata={"description": "stable snake_case code"})


class BatchItem(Schema):
    """A prediction, or the error for that one file (then only `error` and `code`)."""

    prediccion = Integer(validate=Range(0, 9))
    probabilidad = Float(validate=Range(0, 1))
    probabilities = List(Float(validate=Range(0, 1)), validate=Length(equal=10))
    model_version = String()
    cached = Boolean()
    prediction_id = String(metadata={"description": "send it with POST /feedback"})
    error = String()
    code = String()


class BatchResult(Schema):
    """Answers for a batch, in the order of its parts."""

    predictions = List(Nested(BatchItem), required=True)
    model_version = String(required=True)


class VersionQuery(Schema):
    """`?model_version=`: pin an installed version instead of the deployment's choice."""

    class Meta:
        unknown = INCLUDE  # other query parameters are ignored, not refused

    model_version = String(
        metadata={
            "description": "an installed version, `fe5e4f4d480b` or `mnist-cnn-int8-fe5e4f4d480b`"
        }
    )


class ModelInfo(Schema):
    """What `/model` says about the model in use, from its model card."""

    name = String(required=True)
    version = String(required=True)
    model_version = String(required=True)
    sha256 = String(required=True)
    input_shape = List(Integer(), required=True)
    input_dtype = String(required=True)
    quantization = Dict(required=True)
    size_bytes = Integer(required=True)
    labels = List(Integer(), required=True)
    metrics = Dict(required=True)
    created = String(required=True)
    card_matches_file = Boolean(required=True)
    cache = String(required=True, metadata={"description": "cache backend: redis or memory"})


class BrowserModelEntry(Schema):
    """Where a version's browser variant is served and the SHA-256 the page checks."""

    url = String(required=True, metadata={"example": "/models/fe5e4f4d480b/browser-model"})
    sha256 = String(required=True)
    size_bytes = Integer(required=True)


class ModelEntry(Schema):
    """One installed version."""

    model_version = String(required=True, metadata={"example": "mnist-cnn-int8-fe5e4f4d480b"})
    version = String(required=True, metadata={"example": "fe5e4f4d480b"})
    created = String(required=True)
    metrics = Dict(required=True)
    role = String(
        required=True,
        allow_none=True,
        metadata={"description": "stable, candidate, or null (installed, not deployed)"},
    )
    browser_model = Nested(
        BrowserModelEntry,
        required=True,
        allow_none=True,
        metadata={"description": "the page's copy of this version, or null if it has none"},
    )


class ModelList(Schema):
    """Every installed version, oldest first."""

    models = List(Nested(ModelEntry), required=True)


class Health(Schema):
    status = String(required=True, metadata={"example": "ok"})


class Readiness(Schema):
    status = String(required=True, metadata={"example": "ready"})
    model = String(required=True)
    cache = String(required=True, metadata={"description": "redis, memory or degraded"})
    broker = String(required=True, metadata={"description": "ok, eager or down"})
    database = String(
        required=True,
        metadata={"description": "feedback store: ok (server), sqlite (embedded file) or down"},
    )
    deployment = String(
        required=True,
        metadata={
            "description": "ok, or stale: the database is down and this worker serves the "
            "deployment it last read"
        },
    )


class TaskAccepted(Schema):
    """A queued prediction."""

    task_id = String(required=True)
    status_url = String(required=True, metadata={"example": "/tasks/<task_id>"})


class TaskStatus(Schema):
    """State of a queued prediction; `result` once it succeeded, `status` otherwise."""

    state = String(
        required=True,
        validate=OneOf(["PENDING", "STARTED", "SUCCESS", "FAILURE"]),
    )
    result = Nested(Prediction)
    status = String(metadata={"description": "a sentence about the state"})
    code = String(metadata={"description": "error code when state is FAILURE"})


class LocationHeader(Schema):
    """Response headers of /predict_async."""

    location = String(data_key="Location", metadata={"description": "the status URL"})


def documents_json_body(schema: type[Schema]) -> Callable[[View], View]:
    """Document a JSON request body that the view parses and validates itself (so a
    non-admin key gets 403 before its body is looked at, and errors keep the contract's
    codes)."""

    def annotate(view: View) -> View:
        spec = view.__dict__.setdefault("_spec", {})
        spec.update(
            body=schema(), body_example=None, body_examples=None, content_type="application/json"
        )
        return view

    return annotate


STRATEGY_HELP = (
    "single: stable answers everything; shadow: stable answers, the candidate also scores "
    "every miss off the answer; canary: the candidate answers a random candidate_share; ab: "
    "sticky per API key, a key is in the candidate group when hash(key fingerprint, "
    "deployment id) < candidate_share; bandit: Thompson sampling on feedback, never below "
    "min_share for either"
)


class DeploymentGuard(Schema):
    """When the guard rolls the candidate back (canary, ab, bandit)."""

    enabled = Boolean(metadata={"description": "false turns the guard off for this deployment"})
    min_requests = Integer(
        validate=Range(min=1), metadata={"description": "answers per version before judging"}
    )
    max_low_confidence_delta = Float(
        validate=Range(0, 1),
        metadata={"description": "allowed excess share of low-confidence answers"},
    )
    max_error_delta = Float(
        validate=Range(0, 1), metadata={"description": "allowed excess inference error rate"}
    )
    min_feedback = Integer(
        validate=Range(min=1), metadata={"description": "feedback per version before judging"}
    )
    max_accuracy_drop = Float(
        validate=Range(0, 1), metadata={"description": "allowed drop of feedback accuracy"}
    )


class DeploymentChange(Schema):
    """The fields of the deployment to set (all optional; versions short or full form)."""

    strategy = String(
        validate=OneOf(["single", "shadow", "canary", "ab", "bandit"]),
        metadata={"description": STRATEGY_HELP, "example": "canary"},
    )
    stable = String(metadata={"example": "fe5e4f4d480b"})
    candidate = String(allow_none=True, metadata={"example": "3f2a9c1b7d4e"})
    candidate_share = Float(validate=Range(0, 1), metadata={"example": 0.1})
    min_share = Float(validate=Range(0, 0.5), metadata={"example": 0.05})
    guard = Nested(DeploymentGuard)


class DeploymentState(Schema):
    """The deployment in force."""

    id = String(required=True, metadata={"description": "new on every change"})
    strategy = String(required=True, metadata={"description": STRATEGY_HELP})
    stable = String(required=True, metadata={"example": "fe5e4f4d480b"})
    candidate = String(required=True, allow_none=True)
    candidate_share = Float(required=True)
    min_share = Float(required=True)
    guard = Nested(DeploymentGuard, required=True)
    updated_at = String(required=True, metadata={"description": "ISO 8601, UTC"})
    updated_by = String(
        required=True,
        metadata={
            "description": "the admin's name (ADMIN_API_KEYS=name:key) or its fingerprint "
            "keyed with SECRET_KEY (`key-<16 hex>`), `cli`, `guard`, `release`, `retrain` "
            "or `default`"
        },
    )
    previous_stable = String(
        allow_none=True, metadata={"description": "what POST /deployment/rollback brings back"}
    )


class DeploymentHistoryEntry(Schema):
    """One change of the deployment."""

    reason = String(
        required=True,
        validate=OneOf(["manual", "promote", "rollback", "guard", "auto_promote"]),
    )
    detail = String(required=True, metadata={"description": "why, for guard and auto_promote"})
    updated_by = String(required=True)
    updated_at = String(required=True)
    deployment = Nested(DeploymentState, required=True)


class DeploymentHistory(Schema):
    """The last changes, newest first."""

    history = List(Nested(DeploymentHistoryEntry), required=True)


class HistoryQuery(Schema):
    """`?limit=`: how many changes (1-100, default 20)."""

    class Meta:
        unknown = INCLUDE

    limit = String(metadata={"description": "1 to 100 (default 20)"})


class FeedbackUpload(Schema):
    """The judged image (as for /predict), the right digit, and the version that answered."""

    class Meta:
        unknown = INCLUDE  # other form fields are ignored, not refused

    prediction_id = String(
        required=True,
        metadata={"description": "the `prediction_id` of the answer being judged"},
    )
    file = File(
        required=True,
        metadata={"description": "the image that was predicted (the same pixels as then)"},
    )
    label = Integer(
        required=True, validate=Range(0, 9), metadata={"description": "the right digit, 0-9"}
    )


class FeedbackResult(Schema):
    """A stored feedback (201 new, 200 when it replaced this key's earlier label)."""

    feedback_id = Integer(required=True)
    sha256 = String(required=True, metadata={"description": "SHA-256 of the uploaded bytes"})
    input_digest = String(
        required=True,
        metadata={
            "description": "hash of the normalised 28x28 input: the same pixels count once "
            "per key and version, whatever bytes carried them"
        },
    )
    label = Integer(required=True, validate=Range(0, 9))
    model_version = String(required=True, metadata={"example": "mnist-cnn-int8-fe5e4f4d480b"})
    predicted = Integer(required=True, validate=Range(0, 9))
    correct = Boolean(required=True)


class VersionFeedback(Schema):
    """The feedback received about one version's answers."""

    model_version = String(required=True)
    version = String(required=True)
    count = Integer(required=True)
    correct = Integer(required=True)
    accuracy = Float(required=True, validate=Range(0, 1))
    confusion = List(
        List(Integer()),
        required=True,
        metadata={"description": "10x10: confusion[label][predicted] counts"},
    )


class FeedbackStats(Schema):
    """Per version: count, accuracy and confusion matrix of the feedback received."""

    versions = List(Nested(VersionFeedback), required=True)
