"""The Open Inference Protocol's names, data types, limits and parsed-request types (pure,
no Flask).
"""

from __future__ import annotations

import struct
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_api.errors import InvalidInferenceRequest
from mnist_api.imaging.budget import DecodeBudget

MODEL_NAME = "mnist"
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
PROBABILITIES = "probabilities"
DIGIT = "digit"
OUTPUTS = (PROBABILITIES, DIGIT)
NUM_CLASSES = 10
SIDE = 28
# Every datatype the protocol defines: a known one that this model does not take gets
# "takes UINT8 or FP32", an unknown one "unknown datatype".
DATATYPES = frozenset(
    {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
        "BYTES",
    }
)
PIXEL_DTYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
LENGTH_PREFIX = struct.Struct("<I")  # a BYTES element's length prefix: 4 bytes, little-endian

# Values a body may hold besides its tensor data (ids, names, shapes, parameters, outputs).
SPARE_VALUES = 1024


@dataclass(frozen=True)
class Limits:
    """The batch caps: `image` elements (BATCH_MAX_FILES) and `pixels` images, and the
    worker's decode budget that parsing a body reserves its cost from (None: unbounded)."""

    max_images: int
    max_pixels_batch: int
    budget: DecodeBudget | None = None

    @property
    def max_values(self) -> int:
        """The most JSON values a body may hold: a full `pixels` batch nested as [N,28,28,1]
        (each pixel and each row is a value), or a full `image` batch, and the rest."""
        per_image = 2 * SIDE * SIDE + SIDE + 1
        return self.max_pixels_batch * per_image + self.max_images + SPARE_VALUES

    @property
    def capacity(self) -> int:
        """The most bytes parsing one body may hold."""
        return self.budget.capacity if self.budget is not None else sys.maxsize

    def reserve(self, cost: int) -> AbstractContextManager[None]:
        """Hold `cost` bytes of the budget while a body is parsed."""
        return self.budget.reserve(cost) if self.budget is not None else nullcontext()


@dataclass(frozen=True)
class RequestedOutput:
    """One output the client wants, and how: binary or JSON, classified or raw."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class InferenceRequest:
    """A checked infer request: exactly one of `images` (encoded files) or `pixels`."""

    id: str | None
    outputs: tuple[RequestedOutput, ...]
    images: tuple[bytes, ...] = ()
    # (N, 28, 28) float32 in [0, 1], light ink on black: what the model takes as is.
    pixels: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        """N: how many images the request carries."""
        return len(self.pixels) if self.pixels is not None else len(self.images)


def invalid(sentence: str) -> InvalidInferenceRequest:
    """The 400 `invalid_inference_request` error with a sentence a client can act on."""
    return InvalidInferenceRequest(sentence)


def parameters_object(value: object, where: str) -> dict[str, Any]:
    """A `parameters` member: a JSON object, or {} when absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where} must be a JSON object.")
    return value


def flag_param(parameters: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false parameter (`default` when absent)."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise invalid(f"The parameter '{key}' must be true or false.")
    return value


def count_param(parameters: dict[str, Any], key: str, where: str) -> int | None:
    """A whole-number parameter (not a boolean, which JSON would let pass as 0 or 1)."""
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"'{key}' of {where} must be a whole number of at least 0.")
    return value
