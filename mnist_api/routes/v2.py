"""The Open Inference Protocol (KServe V2 REST) on the same app, keys, cache and limits.

`public_bp`: server metadata and health, without a key and without a rate limit (probes).
`bp`: the model routes, with the key and the same per-key limit as /predict. The body
codec is `mnist_api.protocol.codec`; these views only read the request, call the
service and send what the codec built.
"""

from __future__ import annotations

from typing import Any, cast

from apiflask import APIBlueprint, APIFlask
from flask import Response, current_app, g, request

from mnist_api.errors import NotReady
from mnist_api.extensions import get_registry, get_service, get_settings
from mnist_api.http.auth import api_key_auth
from mnist_api.http.request_context import client_identity
from mnist_api.protocol import codec as protocol
from mnist_api.protocol import schemas
from mnist_api.protocol.schemas import document_openapi
from mnist_api.protocol.service import ProtocolService

__all__ = ["bp", "document_openapi", "public_bp"]

TAG = "Open Inference Protocol"
public_bp = APIBlueprint("v2_public", __name__, tag=TAG)
bp = APIBlueprint("v2", __name__, tag=TAG)

SERVER_NAME = "mnist-digit-service"
EXTENSIONS = ["binary_tensor_data", "classification"]
INFER_ERRORS = [400, 401, 404, 413, 415, 422, 503]


def _protocol() -> ProtocolService:
    """The V2 service over this app's prediction service and settings."""
    return ProtocolService(get_service(), get_settings())


# --- health and server metadata (no key) ---


@public_bp.get("/v2")
@public_bp.output(schemas.ServerMetadata)
@public_bp.doc(summary="Server metadata: name, version and protocol extensions")
def server_metadata() -> dict[str, Any]:
    """What this server is and which V2 extensions it speaks."""
    return {
        "name": SERVER_NAME,
        "version": str(cast(APIFlask, current_app).version),
        "extensions": EXTENSIONS,
    }


@public_bp.get("/v2/health/live")
@public_bp.output(schemas.Live)
@public_bp.doc(summary="Server live (200 while the process serves)")
def server_live() -> dict[str, Any]:
    """Always true while the process answers."""
    return {"live": True}


@public_bp.get("/v2/health/ready")
@public_bp.output(schemas.Ready)
@public_bp.doc(summary="Server ready (200 once every model version is loaded)", responses=[503])
def server_ready() -> dict[str, Any]:
    """True once every installed version is loaded and warmed up; 503 before."""
    if not get_registry().ready:
        raise NotReady()
    return {"ready": True}


# --- model metadata and readiness (key) ---


@bp.get("/v2/models/<model_name>")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelMetadata)
@bp.doc(summary="Model metadata: versions, inputs and outputs", responses=[401, 404])
def model_metadata(model_name: str) -> dict[str, Any]:
    """The model's installed versions and its tensors."""
    return _protocol().metadata(model_name, None)


@bp.get("/v2/models/<model_name>/versions/<model_version>")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelMetadata)
@bp.doc(summary="Model metadata of one installed version", responses=[401, 404])
def version_metadata(model_name: str, model_version: str) -> dict[str, Any]:
    """The same metadata; 404 when the version is not installed."""
    return _protocol().metadata(model_name, model_version)


@bp.get("/v2/models/<model_name>/ready")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelReady)
@bp.doc(summary="Model ready (200 once loaded, else 503)", responses=[401, 404, 503])
def model_ready(model_name: str) -> dict[str, Any]:
    """True once every version of the model is loaded."""
    return _protocol().ready(model_name, None)


@bp.get("/v2/models/<model_name>/versions/<model_version>/ready")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelReady)
@bp.doc(summary="Version ready (200 once loaded, else 503)", responses=[401, 404, 503])
def version_ready(model_name: str, model_version: str) -> dict[str, Any]:
    """True once this version is loaded."""
    return _protocol().ready(model_name, model_version)


# --- inference (key, rate limited) ---

INFER_DESCRIPTION = (
    "One input: `image` (BYTES [N], encoded image files, preprocessed and cached like "
    "/predict; base64 strings in JSON) or `pixels` (UINT8 0..255 or FP32 0..1, "
    "[N,28,28] or [N,28,28,1], no preprocessing). Outputs `probabilities` (FP32 [N,10]) and "
    "`digit` (INT64 [N]); the classification extension and the binary tensor data extension "
    "(`Inference-Header-Content-Length`) both ways. A bad image fails the whole request with "
    "the code /predict would give it."
)


def _infer(model_name: str, version: str | None) -> Response:
    answers, body, headers = _protocol().infer(
        model_name,
        version,
        lambda: request.get_data(cache=False),
        request.headers.get(protocol.HEADER_LENGTH),
        content_encoding=request.headers.get("Content-Encoding", "identity"),
        client=client_identity(),
    )
    g.model_version = answers.full_version
    return Response(body, headers=headers)


@bp.post("/v2/models/<model_name>/infer")
@bp.auth_required(api_key_auth)
@bp.output(schemas.InferenceResponse)
@bp.doc(
    summary="Infer (the deployment decides the version)",
    description=INFER_DESCRIPTION,
    responses=INFER_ERRORS,
)
def infer(model_name: str) -> Response:
    """Predict a batch with the version the deployment picks for this key."""
    return _infer(model_name, None)


@bp.post("/v2/models/<model_name>/versions/<model_version>/infer")
@bp.auth_required(api_key_auth)
@bp.output(schemas.InferenceResponse)
@bp.doc(
    summary="Infer with one pinned version", description=INFER_DESCRIPTION, responses=INFER_ERRORS
)
def version_infer(model_name: str, model_version: str) -> Response:
    """Predict a batch with the version the path names (404 if it is not installed)."""
    return _infer(model_name, model_version)
