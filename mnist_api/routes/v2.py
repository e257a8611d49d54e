"""The Open Inference Protocol (KServe V2 REST) on the same app, keys, cache and limits.

`public_bp`: server metadata and health, without a key and without a rate limit (probes).
`bp`: the model routes, with the key and the same per-key limit as /predict. The body
codec is `mnist_api.protocol.codec`; these views only read the request, call the
service and send what the codec built.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from apiflask import APIBlueprint, APIFlask
from flask import Response, current_app, g, request

from mnist_api.errors import ModelNotFound, NotReady, ServiceError, UnsupportedMediaType
from mnist_api.extensions import get_registry, get_service, get_settings
from mnist_api.http.auth import api_key_auth
from mnist_api.inference.model import DigitModel
from mnist_api.protocol import codec as protocol
from mnist_api.protocol import schemas
from mnist_api.protocol.schemas import document_openapi

__all__ = ["bp", "document_openapi", "public_bp"]

TAG = "Open Inference Protocol"
public_bp = APIBlueprint("v2_public", __name__, tag=TAG)
bp = APIBlueprint("v2", __name__, tag=TAG)

SERVER_NAME = "mnist-digit-service"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "tflite"
INFER_ERRORS = [400, 401, 404, 413, 415, 422, 503]


def _client() -> str:
    """The fingerprint of the caller's key: what sticky deployments (A/B) hash."""
    return str(g.get("api_key_fingerprint") or "")


def _model(model_name: str, version: str | None) -> DigitModel | None:
    """The model a path names (None: no version, the deployment decides); 404 otherwise."""
    if model_name != protocol.MODEL_NAME:
        raise ModelNotFound(
            f"No model named {model_name!r}: this server has one model, {protocol.MODEL_NAME!r}."
        )
    if version is None:
        return None
    registry = get_registry()
    if version not in registry:
        raise ModelNotFound(
            f"Model {protocol.MODEL_NAME!r} has no version {version!r}; "
            f"GET /v2/models/{protocol.MODEL_NAME} lists the installed versions."
        )
    return registry.get(version)


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


def _metadata(model_name: str, version: str | None) -> dict[str, Any]:
    _model(model_name, version)
    settings = get_settings()
    return {
        "name": protocol.MODEL_NAME,
        "versions": get_registry().versions(),
        "platform": PLATFORM,
        "inputs": [
            {
                "name": protocol.IMAGE_INPUT,
                "datatype": "BYTES",
                "shape": [-1],
                "parameters": {
                    "description": "encoded image files (PNG, JPEG, GIF, WEBP, BMP), "
                    "preprocessed like /predict; base64 strings in JSON",
                    "max_batch": settings.batch_max_files,
                },
            },
            {
                "name": protocol.PIXELS_INPUT,
                "datatype": "UINT8",
                "shape": [-1, protocol.SIDE, protocol.SIDE],
                "parameters": {
                    "description": "images already in MNIST form: light ink on black, centred",
                    "datatypes": "UINT8 (0..255) or FP32 (0..1)",
                    "shapes": "[-1,28,28] or [-1,28,28,1]",
                    "max_batch": settings.v2_max_pixels_batch,
                },
            },
        ],
        "outputs": [
            {
                "name": protocol.PROBABILITIES,
                "datatype": "FP32",
                "shape": [-1, protocol.NUM_CLASSES],
                "parameters": {"classification": "BYTES '<score>:<index>', best first"},
            },
            {"name": protocol.DIGIT, "datatype": "INT64", "shape": [-1]},
        ],
        "parameters": {"stable_version": get_service().router.stable},
    }


@bp.get("/v2/models/<model_name>")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelMetadata)
@bp.doc(summary="Model metadata: versions, inputs and outputs", responses=[401, 404])
def model_metadata(model_name: str) -> dict[str, Any]:
    """The model's installed versions and its tensors."""
    return _metadata(model_name, None)


@bp.get("/v2/models/<model_name>/versions/<model_version>")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelMetadata)
@bp.doc(summary="Model metadata of one installed version", responses=[401, 404])
def version_metadata(model_name: str, model_version: str) -> dict[str, Any]:
    """The same metadata; 404 when the version is not installed."""
    return _metadata(model_name, model_version)


def _ready(model_name: str, version: str | None) -> dict[str, Any]:
    model = _model(model_name, version)
    ready = model.ready if model is not None else get_registry().ready
    if not ready:
        raise NotReady()
    return {"name": protocol.MODEL_NAME, "ready": True}


@bp.get("/v2/models/<model_name>/ready")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelReady)
@bp.doc(summary="Model ready (200 once loaded, else 503)", responses=[401, 404, 503])
def model_ready(model_name: str) -> dict[str, Any]:
    """True once every version of the model is loaded."""
    return _ready(model_name, None)


@bp.get("/v2/models/<model_name>/versions/<model_version>/ready")
@bp.auth_required(api_key_auth)
@bp.output(schemas.ModelReady)
@bp.doc(summary="Version ready (200 once loaded, else 503)", responses=[401, 404, 503])
def version_ready(model_name: str, model_version: str) -> dict[str, Any]:
    """True once this version is loaded."""
    return _ready(model_name, model_version)


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
    _model(model_name, version)
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise UnsupportedMediaType("Send the inference request uncompressed.")
    settings = get_settings()
    service = get_service()
    # Parsing reserves its cost from the worker's decode budget, as image decodes do.
    limits = protocol.Limits(
        settings.batch_max_files, settings.v2_max_pixels_batch, service.limits.budget
    )
    parsed = protocol.parse_request(
        request.get_data(cache=False), request.headers.get(protocol.HEADER_LENGTH), limits
    )
    if parsed.pixels is not None:
        model, probabilities, ids = service.predict_pixels(
            parsed.pixels, client=_client(), version=version
        )
        digits = np.argmax(probabilities, axis=1)
    else:
        results = service.predict_many(list(parsed.images), client=_client(), version=version)
        answers = []
        for index, result in enumerate(results):
            if isinstance(result, ServiceError):
                # The protocol has no per-element errors: the first bad image fails the
                # request, with the code /predict would give that image.
                raise type(result)(f"Element {index} of input 'image': {result}", result.headers)
            answers.append(result)
        model = service.registry.get(answers[0]["model_version"])
        probabilities = np.array([answer["probabilities"] for answer in answers])
        ids = [str(answer.get("prediction_id", "")) for answer in answers]
        digits = np.array([answer["prediccion"] for answer in answers])
    g.model_version = model.full_version
    body, headers = protocol.build_response(
        parsed, probabilities, digits, model_version=model.version, prediction_ids=ids
    )
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
