"""Feedback: POST /feedback (the right digit for an answer) and GET /feedback/stats."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from apiflask import APIBlueprint
from flask import g, request

from mnist_api import metrics, schemas, uploads
from mnist_api.auth import api_key_auth
from mnist_api.errors import InvalidLabel
from mnist_api.extensions import get_feedback_store, get_service
from mnist_api.feedback import FeedbackEntry
from mnist_api.model import MODEL_NAME
from mnist_api.schemas import documents_upload

bp = APIBlueprint("feedback", __name__, tag="Feedback")

Responses = dict[int | str, dict[str, str | dict[str, dict[str, Any]]]]


def _json(schema: str, description: str) -> dict[str, str | dict[str, dict[str, Any]]]:
    """A documented JSON response with a component schema."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    return {"description": description, "content": content}


FEEDBACK_RESPONSES: Responses = {
    200: _json("FeedbackResult", "Replaced this key's earlier label for this image and version"),
    400: _json("Error", "invalid_label, missing_file or invalid_image"),
    401: _json("Error", "unauthorized"),
    404: _json("Error", "model_not_found"),
    413: _json("Error", "payload_too_large or image_too_large"),
    415: _json("Error", "unsupported_media_type"),
    422: _json("Error", "blank_image"),
    429: _json("Error", "rate_limited"),
    503: _json("Error", "feedback_unavailable (database down or locked) or not_ready"),
}


def parse_label(raw: str | None) -> int:
    """The form's `label` as a digit; `InvalidLabel` (400) when missing or not 0..9."""
    text = (raw or "").strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 9:
        raise InvalidLabel()
    return int(text)


def _client() -> str:
    return str(g.get("api_key_fingerprint") or "")


@bp.post("/feedback")
@bp.auth_required(api_key_auth)
@bp.output(schemas.FeedbackResult, status_code=201)
@bp.doc(
    summary="Tell the service which digit an image really was",
    description=(
        "Multipart `file` (the image that was predicted, as for /predict), `label` (the right "
        "digit, 0-9) and optionally `model_version` (the version whose answer is judged; "
        "default: the one the current deployment would use for this key). The image is "
        "scored again by that version; its normalised 28x28 input, SHA-256, the label and the "
        "prediction are stored (never the upload itself). 201 when new; 200 when this key "
        "already judged this image and version, whose label it replaces."
    ),
    responses=FEEDBACK_RESPONSES,
)
@documents_upload(schemas.FeedbackUpload)
def post_feedback() -> tuple[dict[str, Any], int]:
    """Store the right label for an answer, replacing this key's earlier one."""
    label = parse_label(request.form.get("label"))
    data = uploads.read_single(request)
    version = request.form.get("model_version") or request.args.get("model_version") or None
    service = get_service()
    client = _client()
    model, image, probabilities = service.score_for_feedback(data, client=client, version=version)
    predicted = int(np.argmax(probabilities))
    sha256 = hashlib.sha256(data).hexdigest()
    entry = FeedbackEntry(
        key_fingerprint=client,
        sha256=sha256,
        model_version=model.version,
        label=label,
        predicted=predicted,
        probability=float(probabilities[predicted]),
        image=image,
    )
    recorded = get_feedback_store().record(entry)
    if recorded.created:
        # A replaced label is not a new judgement: counting it again would let one key
        # move the accuracy (and the bandit) by repeating itself.
        metrics.record_feedback(model.full_version, entry.correct)
        _tell_router(model.version, entry.correct)
    g.model_version = model.full_version
    body = {
        "feedback_id": recorded.feedback_id,
        "sha256": sha256,
        "label": label,
        "model_version": model.full_version,
        "predicted": predicted,
        "correct": entry.correct,
    }
    return body, 201 if recorded.created else 200


def _tell_router(version: str, correct: bool) -> None:
    """Feed the deployment (bandit posteriors, guard) when its router takes feedback."""
    record = getattr(get_service().router, "record_feedback", None)
    if record is not None:
        record(version, correct)


@bp.get("/feedback/stats")
@bp.auth_required(api_key_auth)
@bp.output(schemas.FeedbackStats)
@bp.doc(
    summary="Accuracy of each version from the feedback received",
    description="Per version: count, correct, accuracy and confusion[label][predicted].",
    responses=[401, 429, 503],
)
def feedback_stats() -> dict[str, Any]:
    """Count, accuracy and 10x10 confusion matrix of the feedback per version."""
    versions = get_feedback_store().stats()
    return {
        "versions": [
            {"model_version": f"{MODEL_NAME}-{entry['version']}", **entry} for entry in versions
        ]
    }
