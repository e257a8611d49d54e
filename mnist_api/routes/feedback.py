"""Feedback: POST /feedback (the right digit for an answer) and GET /feedback/stats."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from apiflask import APIBlueprint
from flask import g, request

from mnist_api import metrics
from mnist_api.errors import InvalidLabel, InvalidPredictionId, PredictionMismatch
from mnist_api.extensions import get_feedback_store, get_service
from mnist_api.feedback.store import FeedbackEntry
from mnist_api.http import schemas, uploads
from mnist_api.http.auth import api_key_auth
from mnist_api.http.schemas import documents_upload
from mnist_api.inference.model import MODEL_NAME
from mnist_api.inference.prediction_ids import input_digest

bp = APIBlueprint("feedback", __name__, tag="Feedback")

Responses = dict[int | str, dict[str, str | dict[str, dict[str, Any]]]]


def _json(schema: str, description: str) -> dict[str, str | dict[str, dict[str, Any]]]:
    """A documented JSON response with a component schema."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    return {"description": description, "content": content}


FEEDBACK_RESPONSES: Responses = {
    200: _json("FeedbackResult", "Replaced this key's earlier label for this input and version"),
    400: _json(
        "Error",
        "invalid_label, invalid_prediction_id, prediction_mismatch, missing_file or invalid_image",
    ),
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
        "Multipart `prediction_id` (from the answer being judged), `label` (the right digit, "
        "0-9) and `file` (the same image, as for /predict). The version credited is the one "
        "in the prediction_id. 400 `invalid_prediction_id` when it is missing, altered, "
        "expired or issued to another key; 400 `prediction_mismatch` when the image's "
        "normalised input is not the one that was answered. Its normalised 28x28 input, the "
        "label and the prediction are stored (never the upload itself). 201 when new; 200 "
        "when this key already judged these pixels for this version: the label is replaced."
    ),
    responses=FEEDBACK_RESPONSES,
)
@documents_upload(schemas.FeedbackUpload)
def post_feedback() -> tuple[dict[str, Any], int]:
    """Store the right label for an answer, replacing this key's earlier one."""
    label = parse_label(request.form.get("label"))
    service = get_service()
    client = _client()
    if service.ids is None:
        raise InvalidPredictionId()  # unreachable in the app: create_app always signs
    answered = service.ids.verify(request.form.get("prediction_id", "").strip(), client)
    data = uploads.read_single(request)
    model, image, probabilities = service.score_for_feedback(
        data, client=client, version=answered.version
    )
    digest = input_digest(image)
    if digest != answered.input_digest:
        raise PredictionMismatch()
    predicted = int(np.argmax(probabilities))
    sha256 = hashlib.sha256(data).hexdigest()
    entry = FeedbackEntry(
        key_fingerprint=client,
        # The store's per-key row is per normalised input, not per upload: the same pixels
        # in other bytes (a PNG with another text chunk) judge the same answer again.
        sha256=digest,
        model_version=model.version,
        label=label,
        predicted=predicted,
        probability=float(probabilities[predicted]),
        image=image,
        routed=answered.routed,
    )
    recorded = get_feedback_store().record(entry)
    if recorded.created:
        # A replaced label is not a new judgement: counting it again would let one key
        # move the accuracy (and the bandit) by repeating itself.
        metrics.record_feedback(model.full_version, entry.correct)
        if answered.routed:  # a pinned answer is not evidence for the deployment
            get_service().router.record_feedback(
                model.version, entry.correct, client=client, deployment=answered.deployment
            )
    g.model_version = model.full_version
    body = {
        "feedback_id": recorded.feedback_id,
        "sha256": sha256,
        "input_digest": digest,
        "label": label,
        "model_version": model.full_version,
        "predicted": predicted,
        "correct": entry.correct,
    }
    return body, 201 if recorded.created else 200


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
