"""The Open Inference Protocol (KServe V2) REST codec for the digit model, as pure functions.

`parse_request()` turns an infer body (JSON, or a JSON header followed by binary tensor data
when `Inference-Header-Content-Length` is given) into one checked input: encoded image files
(`image`, BYTES) or MNIST-shaped pixels (`pixels`, UINT8 0..255 or FP32 0..1).
`build_response()` turns the model's probabilities into the V2 response: `probabilities`
(FP32 [N,10]) and `digit` (INT64 [N]), only the requested ones, the classification
extension, and binary outputs when asked. No Flask here: the views in `routes/v2.py` pass
bytes and headers in and send bytes and headers out.

Every size a client states (header length, `binary_data_size`, each BYTES element's length,
the shape) is checked against the bytes really received before anything is sliced or
allocated, so a lying request costs nothing and gets a 400 with a sentence.

What a body costs is bounded before it is parsed: `mnist_api.http.json_limits` measures the JSON
(nesting, number of values, strings, floats) from its bytes, `parse_cost()` turns that into
the bytes parsing and converting it will hold, and that much is reserved from the worker's
decode budget while it happens (more than the whole budget: `400 json_too_large`; budget
busy: `503 server_busy`). Float literals are parsed into one compact array instead of a
Python float object each, so a full 1,024-image FP32 batch in JSON fits the default budget.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np

from mnist_api.errors import JsonTooLarge, MissingFile
from mnist_api.http import json_limits
from mnist_api.imaging.budget import MIB

# The codec's whole surface, in one import: the pieces live in types.py (names and limits),
# tensors.py (an input tensor's content) and response.py (the response body).
from mnist_api.protocol.response import build_response, classify
from mnist_api.protocol.tensors import (
    base64_elements,
    binary_pixels,
    bytes_elements,
    checked_pixels,
    describe_input,
    image_batch,
    json_pixels,
    pixels_batch,
    tensor_content,
)
from mnist_api.protocol.types import (
    DATATYPES,
    DIGIT,
    HEADER_LENGTH,
    IMAGE_INPUT,
    MODEL_NAME,
    NUM_CLASSES,
    OUTPUTS,
    PIXEL_DTYPES,
    PIXELS_INPUT,
    PROBABILITIES,
    SIDE,
    InferenceRequest,
    Limits,
    RequestedOutput,
    count_param,
    flag_param,
    invalid,
    parameters_object,
)

__all__ = [
    "DATATYPES",
    "DIGIT",
    "HEADER_LENGTH",
    "IMAGE_INPUT",
    "MODEL_NAME",
    "NUM_CLASSES",
    "OUTPUTS",
    "PIXELS_INPUT",
    "PIXEL_DTYPES",
    "PROBABILITIES",
    "SIDE",
    "InferenceRequest",
    "Limits",
    "RequestedOutput",
    "build_response",
    "classify",
    "invalid",
    "parse_cost",
    "parse_request",
    "split_body",
]

_DIGITS_MAX = 20  # a header length longer than this is no body this service accepts
# Whole numbers outside Python's cached small ints (-5..256) each cost an object; a request
# needs a handful (shape, sizes, classification), pixel data none.
_MAX_LARGE_INTS = 1024
_LARGE_INT_BYTES = 48  # the int object, its slot, and its copy in NumPy's array
# Every float literal of a body stands in its parsed tree as this one object (a NaN, which
# no JSON number can be: NaN and Infinity literals are refused); the values themselves go
# to one compact float32 array, in document order.
_FLOAT = float("nan")

# What parsing holds, in bytes (tests/protocol/test_inference_protocol.py checks the estimate covers
# the peak tracemalloc measures): per value, a list or dict slot with its over-allocation;
# per container, a list or dict object; per object member, its key and hash-table slot; per
# string, a str object; per float literal, its slot in the compact array; per value again,
# the float64 array NumPy builds from the data and the mask of its floats.
_SLOT_BYTES = 9
_CONTAINER_BYTES = 104
_MEMBER_BYTES = 112
_STRING_BYTES = 64
_FLOAT_BYTES = 5
_ARRAY_BYTES = 9
# Per value, once the tree is gone: the float64 (or int64) array, its float32 copy and the
# scaled copy, and a mask.
_CHECK_BYTES = 17
# Per byte of binary tensor data: its copies as BYTES elements, or as float32 pixels (4
# bytes for each UINT8 byte) and the checks' temporaries.
_TAIL_BYTES = 9


# --- request ---


def parse_request(body: bytes, header_length: str | None, limits: Limits) -> InferenceRequest:
    """Parse and check an infer body; `InvalidInferenceRequest` (400) for anything off.

    `header_length` is the `Inference-Header-Content-Length` header (None when absent: the
    whole body is JSON). Oversized batches raise `TooManyFiles` (400 too_many_files), an
    empty `image` element `MissingFile`, like /predict/batch and /predict. Before anything
    is parsed: `JsonTooDeep`/`JsonTooLarge` (400) for a JSON part nested too deeply, with
    too many values or costing more than the whole decode budget, and `Overloaded` (503)
    when the budget stays busy.
    """
    header, binary = split_body(body, header_length)
    size = json_limits.measure(header, limits.max_values)
    cost = parse_cost(size, len(binary), copied=header_length is not None)
    if cost > limits.capacity:
        raise JsonTooLarge(
            f"Parsing this request would take about {-(-cost // MIB)} MiB; the server allows "
            f"{limits.capacity // MIB} MiB per worker. Send fewer images per request, or the "
            f"data as binary ({HEADER_LENGTH})."
        )
    with limits.reserve(cost):
        return _parse(header, binary, limits)


def parse_cost(size: json_limits.JsonSize, tail: int, copied: bool = False) -> int:
    """Upper bound of the bytes parsing a body and building its input will hold at once.

    `size` is its JSON part's measure, `tail` the length of its binary data, `copied` true
    when the JSON part is a copy cut from the body. The str that `json.loads` decodes first
    is gone before NumPy builds its array, so the larger of the two counts.
    """
    chars = 1 if size.ascii else 4  # a str with one non-ASCII character widens them all
    text = size.size * chars
    tree = (
        _SLOT_BYTES * size.values
        + _CONTAINER_BYTES * size.containers
        + _MEMBER_BYTES * size.members
        + _STRING_BYTES * size.strings
        + 2 * chars * size.string_bytes  # the strings, and the bytes base64 decodes to
        + _LARGE_INT_BYTES * min(size.values, _MAX_LARGE_INTS)
    )
    numbers = _FLOAT_BYTES * size.floats
    parsing = text + tree + numbers
    converting = tree + numbers + _ARRAY_BYTES * size.values  # NumPy's array of the data
    checking = _CHECK_BYTES * size.values  # the tree is gone; the array and its checks
    copy = size.size if copied else 0
    return copy + max(parsing, converting, checking) + _TAIL_BYTES * tail


def _parse(header: bytes, binary: memoryview, limits: Limits) -> InferenceRequest:
    numbers = _Numbers()
    document = _load_json(header, numbers)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid("'id' must be a string.")
    parameters = parameters_object(document.get("parameters"), "the request's 'parameters'")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid(
            "Send 'inputs' as a list with one input: 'image' (BYTES) or 'pixels' (UINT8 or FP32)."
        )
    if len(inputs) > 1:
        raise invalid(
            f"This model takes one input ('image' or 'pixels'); the request has {len(inputs)}."
        )
    outputs = _requested_outputs(document.get("outputs"), parameters)
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise invalid("Each input must be a JSON object with 'name', 'shape' and 'datatype'.")
    name, datatype, shape = describe_input(tensor)
    # The batch is checked against its cap before any data is looked at.
    if name == IMAGE_INPUT:
        count = image_batch(datatype, shape, limits)
        data, raw = tensor_content(tensor, name, binary)
        images = bytes_elements(raw, count) if raw is not None else base64_elements(data, count)
        for index, image in enumerate(images):
            if not image:
                raise MissingFile(f"Element {index} of input 'image' is empty.")
        return InferenceRequest(request_id, outputs, images=tuple(images))
    count = pixels_batch(datatype, shape, limits)
    data, raw = tensor_content(tensor, name, binary)
    dtype = PIXEL_DTYPES[datatype]
    if raw is not None:
        values = binary_pixels(raw, count, dtype)
    else:
        values = json_pixels(data, count)
        if values.dtype.kind == "f":
            numbers.fill(values, _floats_before(document, data))
    # Only the array is needed from here: the parsed tree and the float literals go first.
    del document, inputs, tensor, data, numbers
    return InferenceRequest(request_id, outputs, pixels=checked_pixels(values, datatype, count))


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tail) of a body, checking the stated header length against it.

    The tail is a view of the body, not a copy.
    """
    if not body:
        raise invalid("The body is empty: send a JSON inference request.")
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > _DIGITS_MAX:
        raise invalid(f"{HEADER_LENGTH} must be a whole number of bytes.")
    length = int(text)
    if length == 0 or length > len(body):
        raise invalid(
            f"{HEADER_LENGTH} says {length} bytes of JSON, but the body has {len(body)} bytes."
        )
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


class _Numbers:
    """The parser's number hooks: float literals into one compact array, in document order."""

    def __init__(self) -> None:
        # float32, what the model takes: a literal out of its range becomes inf, which the
        # pixel checks refuse like any value outside 0..1.
        self.floats = array("f")
        self.large_ints = 0

    def parse_float(self, text: str) -> float:
        self.floats.append(float(text))
        return _FLOAT

    def parse_int(self, text: str) -> int:
        value = int(text)
        if not -5 <= value <= 256:
            self.large_ints += 1
            if self.large_ints > _MAX_LARGE_INTS:
                raise invalid("Pixel values are 0..255 (UINT8) or 0..1 (FP32).")
        return value

    @staticmethod
    def parse_constant(text: str) -> None:
        raise invalid(f"{text} is not a JSON number: send finite numbers (no NaN or inf).")

    def fill(self, values: np.ndarray, start: int) -> None:
        """Put the float literals of pixel data (NaN in `values`) back, in order."""
        where = np.isnan(values)
        found = int(where.sum())
        if found:
            floats = np.frombuffer(self.floats, dtype=np.float32)
            values[where] = floats[start : start + found]


def _floats_before(node: object, target: object) -> int:
    """Float literals that come before `target` (the pixel data) in document order."""
    return _count_floats(node, target)[0]


def _count_floats(node: object, target: object) -> tuple[int, bool]:
    # Dicts keep their members in document order (duplicate keys are refused), so a walk
    # in order sees the literals in the order the parser met them.
    if node is target:
        return 0, True
    if node is _FLOAT:
        return 1, False
    if not isinstance(node, dict | list):
        return 0, False
    children: Any = node.values() if isinstance(node, dict) else node
    total = 0
    for child in children:
        count, found = _count_floats(child, target)
        total += count
        if found:
            return total, True
    return total, False


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise invalid("A JSON object of the request names the same key twice.")
    return document


def _load_json(header: bytes, numbers: _Numbers) -> dict[str, Any]:
    try:
        document = json_limits.parse(
            header,
            parse_float=numbers.parse_float,
            parse_int=numbers.parse_int,
            parse_constant=numbers.parse_constant,
            object_pairs_hook=_unique_members,
        )
    except ValueError as error:  # UnicodeDecodeError is a ValueError
        raise invalid(
            "The request is not valid JSON (with binary data, "
            f"{HEADER_LENGTH} must give the length of the JSON part)."
        ) from error
    if not isinstance(document, dict):
        raise invalid("The request must be a JSON object with 'inputs'.")
    return document


def _requested_outputs(value: object, parameters: dict[str, Any]) -> tuple[RequestedOutput, ...]:
    """The outputs to return: the named ones in order, or both with the request's settings."""
    binary_default = flag_param(parameters, "binary_data_output", False)
    classify_default = count_param(parameters, "classification", "the request's parameters") or 0
    if value is None or value == []:
        return (
            RequestedOutput(PROBABILITIES, binary_default, min(classify_default, NUM_CLASSES)),
            RequestedOutput(DIGIT, binary_default),
        )
    if not isinstance(value, list):
        raise invalid("'outputs' must be a list of objects with a 'name'.")
    outputs: list[RequestedOutput] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid("Each requested output must be an object with a 'name'.")
        name = item["name"]
        if name not in OUTPUTS:
            raise invalid(f"Unknown output {name!r}: this model has 'probabilities' and 'digit'.")
        if any(output.name == name for output in outputs):
            raise invalid(f"The output {name!r} is requested twice.")
        output_parameters = parameters_object(
            item.get("parameters"), f"output {name!r}'s parameters"
        )
        classification = count_param(output_parameters, "classification", f"output {name!r}")
        if classification and name != PROBABILITIES:
            raise invalid("The classification extension works on 'probabilities' only.")
        if classification is None:
            classification = classify_default if name == PROBABILITIES else 0
        binary = flag_param(output_parameters, "binary_data", binary_default)
        # Asking for more classes than there are returns them all, best first.
        outputs.append(RequestedOutput(name, binary, min(classification, NUM_CLASSES)))
    return tuple(outputs)
