"""The V2 response: the requested outputs, the classification extension and binary tensor
data (pure, no Flask).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mnist_api.protocol.types import (
    DIGIT,
    HEADER_LENGTH,
    LENGTH_PREFIX,
    MODEL_NAME,
    NUM_CLASSES,
    PROBABILITIES,
    InferenceRequest,
    RequestedOutput,
)

# --- response ---


def build_response(
    request: InferenceRequest,
    probabilities: np.ndarray,
    digits: np.ndarray,
    *,
    model_version: str,
    model_name: str = MODEL_NAME,
    prediction_ids: list[str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The V2 response body and its headers for (N, 10) `probabilities` and (N,) `digits`.

    Probabilities are rounded to 6 decimals like every answer of the service; the digits
    are given, not recomputed, so a tie after rounding cannot change an answer. Outputs come
    in the order requested; binary ones follow the JSON, in the same order, and the
    `Inference-Header-Content-Length` header gives the JSON's length. `prediction_ids`
    (one per image, what /feedback takes) go in the response parameter `prediction_ids`.
    """
    rounded = np.round(np.asarray(probabilities, dtype=np.float64), 6)
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for requested in request.outputs:
        output, data = _output_tensor(requested, rounded, digits)
        if requested.binary:
            payload = _binary(output["datatype"], data)
            output["parameters"] = {"binary_data_size": len(payload)}
            tail.append(payload)
        else:
            output["data"] = _json_data(output["datatype"], data)
        outputs.append(output)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    if prediction_ids:
        document["parameters"] = {"prediction_ids": prediction_ids}
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    if not tail:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(tail), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _output_tensor(
    requested: RequestedOutput, probabilities: np.ndarray, digits: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    count = len(probabilities)
    if requested.name == DIGIT:
        return {"name": DIGIT, "datatype": "INT64", "shape": [count]}, np.asarray(digits)
    if requested.classification:
        labels = classify(probabilities, requested.classification)
        shape = [count, requested.classification]
        return {"name": PROBABILITIES, "datatype": "BYTES", "shape": shape}, labels
    shape = [count, NUM_CLASSES]
    return {"name": PROBABILITIES, "datatype": "FP32", "shape": shape}, probabilities


def classify(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The classification extension: (N, k) strings "<score>:<index>", best first."""
    # A stable sort keeps equal scores in index order, so answers are reproducible.
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = [
        [f"{row[i]:.6f}:{i}" for i in best] for row, best in zip(probabilities, order, strict=True)
    ]
    return np.array(rows, dtype=object).reshape(len(probabilities), k)


def _json_data(datatype: str, data: np.ndarray) -> list[Any]:
    # FP32 data comes from the rounded float64 answer, so JSON shows 0.998123, not
    # float32's 0.9981229901...; binary data carries the float32 values.
    values: list[Any] = data.reshape(-1).tolist()
    return values


def _binary(datatype: str, data: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(
            LENGTH_PREFIX.pack(len(encoded)) + encoded
            for encoded in (str(item).encode() for item in data.reshape(-1))
        )
    dtype = np.dtype("<f4") if datatype == "FP32" else np.dtype("<i8")
    return np.ascontiguousarray(data, dtype=dtype).tobytes()
