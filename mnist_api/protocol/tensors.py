"""One V2 input tensor's content, checked and decoded: image files (BYTES) or pixels
(UINT8/FP32), from JSON or from binary tensor data (pure, no Flask).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from mnist_api.errors import TooManyFiles
from mnist_api.protocol.types import (
    DATATYPES,
    IMAGE_INPUT,
    LENGTH_PREFIX,
    PIXEL_DTYPES,
    PIXELS_INPUT,
    SIDE,
    Limits,
    count_param,
    invalid,
    parameters_object,
)


def describe_input(tensor: dict[str, Any]) -> tuple[str, str, list[int]]:
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


def tensor_content(
    tensor: dict[str, Any], name: str, binary: memoryview
) -> tuple[object, memoryview | None]:
    """The input's JSON `data`, or its slice of the binary tail (which it must fill exactly)."""
    parameters = parameters_object(tensor.get("parameters"), f"input {name!r}'s parameters")
    size = count_param(parameters, "binary_data_size", f"input {name!r}")
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


def image_batch(datatype: str, shape: list[int], limits: Limits) -> int:
    if datatype != "BYTES":
        raise invalid(f"Input 'image' is BYTES (encoded image files), not {datatype}.")
    if len(shape) != 1:
        raise invalid(f"Input 'image' has shape [N], one element per image, not {shape}.")
    return batch(shape[0], limits.max_images, "image")


def pixels_batch(datatype: str, shape: list[int], limits: Limits) -> int:
    if datatype not in PIXEL_DTYPES:
        raise invalid(f"Input 'pixels' is UINT8 (0..255) or FP32 (0..1), not {datatype}.")
    if shape[1:] not in ([SIDE, SIDE], [SIDE, SIDE, 1]):
        raise invalid(f"Input 'pixels' has shape [N,28,28] or [N,28,28,1], not {shape}.")
    return batch(shape[0], limits.max_pixels_batch, "pixels")


def batch(count: int, cap: int, name: str) -> int:
    if count == 0:
        raise invalid(f"Input {name!r} has a batch of 0: send at least one image.")
    if count > cap:
        raise TooManyFiles(f"Input {name!r} takes at most {cap} images; this one has {count}.")
    return count


def bytes_elements(raw: memoryview, count: int) -> list[bytes]:
    """BYTES binary data: `count` elements, each a 4-byte little-endian length + its bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < LENGTH_PREFIX.size:
            raise invalid("The binary data of input 'image' ends inside an element's length.")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
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


def base64_elements(data: object, count: int) -> list[bytes]:
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


def binary_pixels(raw: memoryview, count: int, dtype: np.dtype[Any]) -> np.ndarray:
    expected = count * SIDE * SIDE * dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"Input 'pixels' of {count} images needs {expected} bytes of binary data, "
            f"not {len(raw)}."
        )
    return np.frombuffer(raw, dtype=dtype)


def json_pixels(data: object, count: int) -> np.ndarray:
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


def checked_pixels(values: np.ndarray, datatype: str, count: int) -> np.ndarray:
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
