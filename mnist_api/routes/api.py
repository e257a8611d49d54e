"""The keyed API: /predict, /predict/batch, /predict_async, /tasks, /model, /models and the
browser variant of each version (/models/<version>/browser-model)."""

from __future__ import annotations

import json
from typing import Any

from apiflask import APIBlueprint
from apiflask.schemas import FileSchema
from flask import Response, g, request, send_file, url_for

from mnist_api.errors import NotReady
from mnist_api.extensions import (
    get_cache,
    get_jobs,
    get_registry,
    get_service,
    get_settings,
)
from mnist_api.http import rate_limits, schemas, uploads
from mnist_api.http.auth import api_key_auth
from mnist_api.http.request_context import client_identity
from mnist_api.http.schemas import documents_query, documents_upload

bp = APIBlueprint("api", __name__, tag="Predictions")

UPLOAD_ERRORS = [400, 401, 404, 413, 415, 422, 429, 503]


def _pinned_version() -> str | None:
    """`?model_version=` (short or full form), or None to let the deployment decide."""
    return request.args.get("model_version") or None


@bp.post("/predict")
@bp.auth_required(api_key_auth)
@bp.output(schemas.Prediction, headers=schemas.CacheHeaders)
@bp.doc(
    summary="Predict the digit in one image",
    description=(
        "Send the image as multipart field `file`, or as the raw body with "
        "`Content-Type: image/png|jpeg|gif|webp|bmp`. The deployment decides which model "
        "version answers unless `model_version` pins one."
    ),
    responses=UPLOAD_ERRORS,
)
@documents_upload(schemas.Upload)
@documents_query(schemas.VersionQuery)
@rate_limits.counted_with_lookup
def predict() -> Response:
    """Predict one upload."""
    data = uploads.read_single(request)
    result = get_service().predict(
        data, client=client_identity(), version=_pinned_version(), along=rate_limits.pending()
    )
    g.digit = result["prediccion"]
    g.model_version = result["model_version"]
    # The answer is already exactly the documented shape: serialise it directly (this is
    # the hot path; a schema dump would only copy it).
    response = Response(json.dumps(result, separators=(",", ":")), mimetype="application/json")
    response.headers["X-Cache"] = "HIT" if result["cached"] else "MISS"
    return response


@bp.post("/predict/batch")
@bp.auth_required(api_key_auth)
@bp.output(schemas.BatchResult)
@bp.doc(
    summary="Predict the digits of several images at once",
    description=(
        "One `files` part per image; a bad file gets its own error in place. The whole batch "
        "is answered by one model version (`model_version` pins it)."
    ),
    responses=[400, 401, 404, 413, 415, 429, 503],
)
@documents_upload(schemas.BatchUpload)
@documents_query(schemas.VersionQuery)
@rate_limits.counted_with_lookup
def predict_batch() -> dict[str, Any]:
    """Predict a batch of uploads with one model call."""
    settings = get_settings()
    service = get_service()
    # Decided once for the batch, so its answers and its `model_version` agree.
    route = service.route_for(client_identity(), _pinned_version())
    results = service.predict_many(
        uploads.read_batch(request, settings.batch_max_files),
        client=client_identity(),
        route=route,
        along=rate_limits.pending(),
    )
    predictions = [item if isinstance(item, dict) else item.to_dict() for item in results]
    g.model_version = service.registry.get(route.answer).full_version
    return {"predictions": predictions, "model_version": g.model_version}


@bp.post("/predict_async")
@bp.auth_required(api_key_auth)
@bp.output(
    schemas.TaskAccepted,
    status_code=202,
    headers=schemas.LocationHeader,
    # Tells clients (and schemathesis' stateful tests) where the id goes next.
    links={
        "TaskStatus": {
            "operationId": "api_task_status",
            "parameters": {"task_id": "$response.body#/task_id"},
        }
    },
)
@bp.doc(
    summary="Queue a prediction and poll its status",
    description=(
        "Same body as /predict, validated now (same errors). Answers 202 with the task id; "
        "poll `status_url`. The version is chosen now, as for /predict (`model_version` "
        "pins it)."
    ),
    responses=UPLOAD_ERRORS,
)
@documents_upload(schemas.Upload)
@documents_query(schemas.VersionQuery)
def predict_async() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Accept an upload for an async prediction."""
    data = uploads.read_single(request)
    task_id = get_jobs().submit(
        data, g.request_id, client=client_identity(), version=_pinned_version()
    )
    status_url = url_for("api.task_status", task_id=task_id)
    return {"task_id": task_id, "status_url": status_url}, 202, {"Location": status_url}


@bp.get("/tasks/<task_id>")
@bp.auth_required(api_key_auth)
@bp.output(schemas.TaskStatus)
@bp.doc(
    summary="State of a queued prediction",
    responses=[401, 404, 503],
    operation_id="api_task_status",
)
def task_status(task_id: str) -> dict[str, Any]:
    """PENDING, STARTED, SUCCESS (with the result) or FAILURE (with a message)."""
    return get_jobs().status(task_id)


@bp.get("/model")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelInfo)
@bp.doc(
    summary="Describe the stable model (or the version `model_version` names)",
    responses=[401, 404, 503],
)
@documents_query(schemas.VersionQuery)
def model_info() -> dict[str, Any]:
    """The loaded model's own facts, with accuracy and date from its model card."""
    service = get_service()
    model = service.registry.get(_pinned_version() or service.router.stable)
    if not model.ready:
        raise NotReady()
    return {**model.describe(), "cache": get_cache().backend}


@bp.get("/models")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelList)
@bp.doc(summary="The installed model versions and their roles", responses=[401])
def models() -> dict[str, Any]:
    """Every installed version, oldest first, with `role` stable, candidate or null."""
    return {"models": get_registry().describe(get_service().router.roles())}


@bp.get("/models/<model_version>/browser-model")
@bp.auth_required(api_key_auth)
@bp.output(FileSchema, content_type="application/octet-stream")
@bp.doc(
    summary="The browser variant of a version (for on-device prediction in the page)",
    description=(
        "The `.tflite` the page runs with LiteRT.js: the version's own int8 graph with a "
        "float32 input and output. `X-Model-SHA256` (and the ETag) carry the SHA-256 from "
        "the model card; the page checks the bytes against it before use."
    ),
    responses=[401, 404, 429],
)
def browser_model(model_version: str) -> Response:
    """The file, with its SHA-256; 404 when the version or its variant is missing."""
    registry = get_registry()
    found = registry.browser_model(model_version)
    version = registry.get(model_version).version
    response = send_file(
        found.path,
        mimetype="application/octet-stream",
        download_name=f"mnist-cnn-int8-{version}-browser.tflite",
        etag=found.sha256,
        conditional=True,
        max_age=0,
    )
    # Keyed content: no shared cache may keep it; the page's service worker keeps its copy.
    response.headers["Cache-Control"] = "private, no-cache"
    response.headers["X-Model-SHA256"] = found.sha256
    response.headers["X-Model-Version"] = registry.get(model_version).full_version
    return response
