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

import base64
import binascii
import json
import struct
import sys
from array import array
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_api.errors import InvalidInferenceRequest, JsonTooLarge, MissingFile, TooManyFiles
from mnist_api.http import json_limits
from mnist_api.imaging.budget import MIB, DecodeBudget

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
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix: 4 bytes, little-endian
_DIGITS_MAX = 20  # a header length longer than this is no body this service accepts
# Values a body may hold besides its tensor data (ids, names, shapes, parameters, outputs).
_SPARE_VALUES = 1024
# Whole numbers outside Python's cached small ints (-5..256) each cost an object; a request
# needs a handful (shape, sizes, classification), pixel data none.
_MAX_LARGE_INTS = 1024
_LARGE_INT_BYTES = 48  # the int object, its slot, and its copy in NumPy's array
# Every float literal of a body stands in its parsed tree as this one object (a NaN, which
# no JSON number can be: NaN and Infinity literals are refused); the values themselves go
# to one compact float32 array, in document order.
_FLOAT = float("nan")

# What parsing holds, in bytes (tests/test_inference_protocol.py checks the estimate covers
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
        return self.max_pixels_batch * per_image + self.max_images + _SPARE_VALUES

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
    parameters = _parameters(document.get("parameters"), "the request's 'parameters'")
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
    name, datatype, shape = _describe_input(tensor)
    # The batch is checked against its cap before any data is looked at.
    if name == IMAGE_INPUT:
        count = _image_batch(datatype, shape, limits)
        data, raw = _tensor_content(tensor, name, binary)
        images = _bytes_elements(raw, count) if raw is not None else _base64_elements(data, count)
        for index, image in enumerate(images):
            if not image:
                raise MissingFile(f"Element {index} of input 'image' is empty.")
        return InferenceRequest(request_id, outputs, images=tuple(images))
    count = _pixels_batch(datatype, shape, limits)
    data, raw = _tensor_content(tensor, name, binary)
    dtype = PIXEL_DTYPES[datatype]
    if raw is not None:
        values = _binary_pixels(raw, count, dtype)
    else:
        values = _json_pixels(data, count)
        if values.dtype.kind == "f":
            numbers.fill(values, _floats_before(document, data))
    # Only the array is needed from here: the parsed tree and the float literals go first.
    del document, inputs, tensor, data, numbers
    return InferenceRequest(request_id, outputs, pixels=_checked_pixels(values, datatype, count))


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


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where} must be a JSON object.")
    return value


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise invalid(f"The parameter '{key}' must be true or false.")
    return value


def _count(parameters: dict[str, Any], key: str, where: str) -> int | None:
    """A whole-number parameter (not a boolean, which JSON would let pass as 0 or 1)."""
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"'{key}' of {where} must be a whole number of at least 0.")
    return value


def _requested_outputs(value: object, parameters: dict[str, Any]) -> tuple[RequestedOutput, ...]:
    """The outputs to return: the named ones in order, or both with the request's settings."""
    binary_default = _flag(parameters, "binary_data_output", False)
    classify_default = _count(parameters, "classification", "the request's parameters") or 0
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
        output_parameters = _parameters(item.get("parameters"), f"output {name!r}'s parameters")
        classification = _count(output_parameters, "classification", f"output {name!r}")
        if classification and name != PROBABILITIES:
            raise invalid("The classification extension works on 'probabilities' only.")
        if classification is None:
            classification = classify_default if name == PROBABILITIES else 0
        binary = _flag(output_parameters, "binary_data", binary_default)
        # Asking for more classes than there are returns them all, best first.
        outputs.append(RequestedOutput(name, binary, min(classification, NUM_CLASSES)))
    return tuple(outputs)


def _describe_input(tensor: dict[str, Any]) -> tuple[str, str, list[int]]:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name not in (IMAGE_INPUT, PIXELS_INPUT):
        raise invalid(
            f"Unknown input {name!r}: send 'image' (BYTES, encoded image files) or "
            "'pixels' (UINT8 0..255 or FP32 0..1, shape [N,28,28])."
        )
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise invalid(f"Unknown datatype {datatype!r} for input {name!r}.")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise invalid(f"The shape of input {name!r} must be a list of whole numbers >= 0.")
    return name, datatype, shape


def _tensor_content(
    tensor: dict[str, Any], name: str, binary: memoryview
) -> tuple[object, memoryview | None]:
    """The input's JSON `data`, or its slice of the binary tail (which it must fill exactly)."""
    parameters = _parameters(tensor.get("parameters"), f"input {name!r}'s parameters")
    size = _count(parameters, "binary_data_size", f"input {name!r}")
    if size is None:
        if binary:
            raise invalid(
                f"The body has {len(binary)} bytes after the JSON, but input {name!r} has no "
                "'binary_data_size' parameter."
            )
        if "data" not in tensor:
            raise invalid(f"Input {name!r} has neither 'data' nor a 'binary_data_size'.")
        return tensor["data"], None
    if "data" in tensor:
        raise invalid(f"Input {name!r} has both 'data' and a 'binary_data_size'; send one.")
    if size != len(binary):
        raise invalid(
            f"Input {name!r} says binary_data_size {size}, but {len(binary)} bytes follow the JSON."
        )
    return None, binary


def _image_batch(datatype: str, shape: list[int], limits: Limits) -> int:
    if datatype != "BYTES":
        raise invalid(f"Input 'image' is BYTES (encoded image files), not {datatype}.")
    if len(shape) != 1:
        raise invalid(f"Input 'image' has shape [N], one element per image, not {shape}.")
    return _batch(shape[0], limits.max_images, "image")


def _pixels_batch(datatype: str, shape: list[int], limits: Limits) -> int:
    if datatype not in PIXEL_DTYPES:
        raise invalid(f"Input 'pixels' is UINT8 (0..255) or FP32 (0..1), not {datatype}.")
    if shape[1:] not in ([SIDE, SIDE], [SIDE, SIDE, 1]):
        raise invalid(f"Input 'pixels' has shape [N,28,28] or [N,28,28,1], not {shape}.")
    return _batch(shape[0], limits.max_pixels_batch, "pixels")


def _batch(count: int, cap: int, name: str) -> int:
    if count == 0:
        raise invalid(f"Input {name!r} has a batch of 0: send at least one image.")
    if count > cap:
        raise TooManyFiles(f"Input {name!r} takes at most {cap} images; this one has {count}.")
    return count


def _bytes_elements(raw: memoryview, count: int) -> list[bytes]:
    """BYTES binary data: `count` elements, each a 4-byte little-endian length + its bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < _LENGTH.size:
            raise invalid("The binary data of input 'image' ends inside an element's length.")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if length > len(raw) - offset:
            raise invalid(
                f"Element {len(elements)} of input 'image' says {length} bytes, but only "
                f"{len(raw) - offset} are left."
            )
        if len(elements) == count:
            break  # more elements than the shape says: reported below
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(elements) != count or offset != len(raw):
        raise invalid(
            f"The binary data of input 'image' does not hold exactly {count} elements, as its "
            "shape says."
        )
    return elements


def _base64_elements(data: object, count: int) -> list[bytes]:
    """BYTES JSON data: a list of `count` base64 strings, one encoded image file each."""
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise invalid("The data of input 'image' must be a list of base64 strings.")
    if len(data) != count:
        raise invalid(f"Input 'image' has shape [{count}] but {len(data)} elements of data.")
    elements = []
    for index, item in enumerate(data):
        try:
            elements.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as error:
            raise invalid(f"Element {index} of input 'image' is not valid base64.") from error
    return elements


def _binary_pixels(raw: memoryview, count: int, dtype: np.dtype[Any]) -> np.ndarray:
    expected = count * SIDE * SIDE * dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"Input 'pixels' of {count} images needs {expected} bytes of binary data, "
            f"not {len(raw)}."
        )
    return np.frombuffer(raw, dtype=dtype)


def _json_pixels(data: object, count: int) -> np.ndarray:
    """JSON data, flat or nested as the shape, as a NumPy array (any numeric kind for now)."""
    expected = count * SIDE * SIDE
    if not isinstance(data, list):
        raise invalid("The data of input 'pixels' must be a list of numbers.")
    if data and not isinstance(data[0], list) and len(data) != expected:
        raise invalid(f"Input 'pixels' of {count} images needs {expected} values, not {len(data)}.")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as error:  # ragged, or numbers out of range
        raise invalid("The data of input 'pixels' must be a regular array of numbers.") from error
    if values.size != expected:
        raise invalid(
            f"Input 'pixels' of {count} images needs {expected} values, not {values.size}."
        )
    return values.reshape(-1)


def _checked_pixels(values: np.ndarray, datatype: str, count: int) -> np.ndarray:
    """Values of the declared type and range, as the model's (N, 28, 28) float32 in [0, 1]."""
    if datatype == "UINT8":
        if values.dtype.kind not in "iu":
            raise invalid("UINT8 pixels must be whole numbers from 0 to 255.")
        if values.dtype != np.uint8 and (values.min() < 0 or values.max() > 255):
            raise invalid("UINT8 pixels must be whole numbers from 0 to 255.")
        scaled = values.astype(np.float32) / np.float32(255.0)
    else:
        if values.dtype.kind not in "iuf":
            raise invalid("FP32 pixels must be numbers from 0 to 1.")
        if not bool(np.isfinite(values).all()):
            raise invalid("FP32 pixels must be finite numbers from 0 to 1 (no NaN or inf).")
        # Checked before the cast: 1e300 would become inf (and a warning) as float32.
        if float(values.min()) < 0.0 or float(values.max()) > 1.0:
            raise invalid("FP32 pixels must be numbers from 0 to 1 (light ink on black).")
        scaled = values.astype(np.float32)
    return scaled.reshape(count, SIDE, SIDE)


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
            _LENGTH.pack(len(encoded)) + encoded
            for encoded in (str(item).encode() for item in data.reshape(-1))
        )
    dtype = np.dtype("<f4") if datatype == "FP32" else np.dtype("<i8")
    return np.ascontiguousarray(data, dtype=dtype).tobytes()
