"""OpenAPI documentation of the Open Inference Protocol routes (/v2/...).

The answers of the small routes are marshmallow schemas (they also shape the answers); the
infer body is a JSON Schema written out here, because its binary variant (a JSON header
followed by raw tensor bytes) is no marshmallow shape: `document_openapi()` adds both
content types, the `Inference-Header-Content-Length` header and the binary answer to the
generated document.
"""

from __future__ import annotations

from typing import Any

from apiflask import Schema
from apiflask.fields import Boolean, Dict, Integer, List, Nested, Raw, String


class ServerMetadata(Schema):
    """`GET /v2`."""

    name = String(required=True, metadata={"example": "mnist-digit-service"})
    version = String(required=True, metadata={"example": "1.0.0"})
    extensions = List(
        String(), required=True, metadata={"example": ["binary_tensor_data", "classification"]}
    )


class Live(Schema):
    """`GET /v2/health/live`."""

    live = Boolean(required=True)


class Ready(Schema):
    """`GET /v2/health/ready`."""

    ready = Boolean(required=True)


class ModelReady(Schema):
    """`GET /v2/models/mnist[/versions/<v>]/ready`."""

    name = String(required=True, metadata={"example": "mnist"})
    ready = Boolean(required=True)


class MetadataTensor(Schema):
    """One input or output of the model."""

    name = String(required=True)
    datatype = String(required=True)
    shape = List(Integer(), required=True, metadata={"description": "-1: any size"})
    parameters = Dict(metadata={"description": "what else this tensor accepts"})


class ModelMetadata(Schema):
    """`GET /v2/models/mnist[/versions/<v>]`."""

    name = String(required=True, metadata={"example": "mnist"})
    versions = List(String(), required=True, metadata={"example": ["fe5e4f4d480b"]})
    platform = String(required=True, metadata={"example": "tflite"})
    inputs = List(Nested(MetadataTensor), required=True)
    outputs = List(Nested(MetadataTensor), required=True)
    parameters = Dict()


class ResponseOutput(Schema):
    """One output tensor of an answer: its data in JSON, or its size in the binary tail."""

    name = String(required=True)
    datatype = String(required=True)
    shape = List(Integer(), required=True)
    parameters = Dict(metadata={"description": "binary_data_size when the data is binary"})
    data = List(Raw(), metadata={"description": "row-major, flattened"})


class InferenceResponse(Schema):
    """The answer of `POST /v2/models/mnist[/versions/<v>]/infer` (JSON variant)."""

    model_name = String(required=True, metadata={"example": "mnist"})
    model_version = String(required=True, metadata={"example": "fe5e4f4d480b"})
    id = String(metadata={"description": "the request's id, echoed"})
    parameters = Dict()
    outputs = List(Nested(ResponseOutput), required=True)


# A drawn 7 as a 28x28 PNG, base64: the example body answers in Swagger UI's "Try it out".
SEVEN_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAA5ElEQVR4nI3SMW4CMRAF0BmydJAIISHtRVCKHACO"
    "wAWSIk0kmpwjEgUNp+AGFCmyNYdACLFVUDLjT2GQPV6zYgq7ePu9vxgG3Z5Oi1HhrzTP/mx71idR22/4ia8Irsd1"
    "ELDr/wzBRATAYZ+89wg4AP6fp69TENfZrj8+e2AiZGZKMxUAF/wP8+sWVB6hAcOo7ka0giCHgld6ceJyKPguupUP"
    "puhEn+n9YikKllTuVXMYt2lg3CZF0yZB2yZB28Zi0sai4C1uY1CwoYcqDkaof5PB3BiiBdNDMQCbVbp3qdHY3rbk"
    "Ge0EwPmONjwPAAAAAElFTkSuQmCC"
)

_OUTPUT_PARAMETERS = {
    "type": "object",
    "properties": {
        "binary_data": {"type": "boolean", "description": "return this output as binary"},
        "classification": {
            "type": "integer",
            "minimum": 0,
            "description": "top k classes as BYTES '<score>:<index>' (probabilities only)",
        },
    },
}

INFERENCE_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "description": (
        "One input: `image` (BYTES, shape [N], base64 strings in JSON, encoded image files) "
        "or `pixels` (UINT8 0..255 or FP32 0..1, shape [N,28,28] or [N,28,28,1], light ink "
        "on black)."
    ),
    "properties": {
        "id": {"type": "string", "description": "echoed in the answer"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "classification": {"type": "integer", "minimum": 0},
            },
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string", "enum": ["image", "pixels"]},
                    "datatype": {"type": "string", "enum": ["BYTES", "UINT8", "FP32"]},
                    "shape": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "integer", "minimum": 0},
                    },
                    "parameters": {
                        "type": "object",
                        "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                    },
                    "data": {"type": "array", "items": {}},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": ["probabilities", "digit"]},
                    "parameters": _OUTPUT_PARAMETERS,
                },
            },
        },
    },
    "example": {
        "id": "42",
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [SEVEN_PNG]}],
        "outputs": [
            {"name": "digit"},
            {"name": "probabilities", "parameters": {"classification": 3}},
        ],
    },
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "length of the JSON part when binary tensor data follows it",
    "schema": {"type": "integer", "minimum": 0},
}


def document_openapi(spec: dict[str, Any]) -> None:
    """Add the infer request body (JSON and binary) and the binary answer to the document,
    and name the one model in the `model_name` path parameters."""
    spec.setdefault("components", {}).setdefault("schemas", {})["InferenceRequest"] = (
        INFERENCE_REQUEST
    )
    for path, operations in spec.get("paths", {}).items():
        if not path.startswith("/v2/models/"):
            continue
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "model_name":
                    # One model: saying so lets clients (and fuzzers) reach past the 404.
                    parameter["schema"] = {"type": "string", "enum": ["mnist"]}
                elif parameter.get("in") == "path" and parameter.get("name") == "model_version":
                    parameter["description"] = "an installed version, e.g. `fe5e4f4d480b`"
        if not path.endswith("/infer"):
            continue
        operation = operations.get("post")
        if operation is None:
            continue
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                # The binary tensor data extension: JSON, then the tensors' bytes.
                "application/octet-stream": _BINARY,
            },
        }
        operation.setdefault("parameters", []).append(_HEADER_LENGTH)
        answer = operation.get("responses", {}).get("200", {})
        answer.setdefault("content", {})["application/octet-stream"] = _BINARY
        answer.setdefault("headers", {})["Inference-Header-Content-Length"] = {
            "description": "length of the JSON part when binary outputs follow it",
            "schema": {"type": "integer"},
        }
