"""Feedback: POST /feedback (the right digit for an answer) and GET /feedback/stats."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint
from flask import g, request

from mnist_api.extensions import get_feedback_store, get_service
from mnist_api.feedback.service import FeedbackService
from mnist_api.http import schemas, uploads
from mnist_api.http.auth import api_key_auth
from mnist_api.http.request_context import client_identity
from mnist_api.http.schemas import documents_upload

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


def _feedback() -> FeedbackService:
    """The feedback service over this app's prediction service and store."""
    return FeedbackService(get_service(), get_feedback_store())


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
    receipt = _feedback().submit(
        label=request.form.get("label"),
        prediction_id=request.form.get("prediction_id", ""),
        read_upload=lambda: uploads.read_single(request),
        client=client_identity(),
    )
    g.model_version = receipt.model_version
    return receipt.body, 201 if receipt.created else 200


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
    return _feedback().stats()
