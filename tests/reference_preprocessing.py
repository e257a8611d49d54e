"""A frozen copy of `mnist_api.imaging.preprocessing` before its 8-bit fast path (commit b38f555).

`tests/imaging/test_preprocessing.py` checks that the service's `preprocess` and `normalize_digit`
still return exactly (bit for bit) what this straightforward version returns: the fast path
must be a pure speed-up. Do not edit it to follow later changes of the algorithm; replace
it on purpose if the output is meant to change.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mnist_api.errors import BlankImage
from mnist_api.imaging.decoding import (
    MAX_WORK_PIXELS,
    Header,
    coarsest_scale,
    decode_cost,
    decode_reduced,
    fit_scale,
    open_image,
    read_header,
    work_pixels,
)
from mnist_api.imaging.preprocessing import Limits

MNIST_SIZE = 28
DIGIT_BOX = 20
MIN_DIGIT_PIXELS = 48
MIN_CONTRAST = 24.0
INK_FLOOR = 0.25


def preprocess(data: bytes, limits: Limits | None = None) -> np.ndarray:
    """Decode an upload and return the model's input: float32 (28, 28) in [0, 1], ink = 1.

    Raises `InvalidImage`, `UnsupportedMediaType`, `ImageTooLarge`, `BlankImage`, or
    `Overloaded` when the worker's decode budget stayed full for too long.
    """
    limits = limits or Limits()
    image = open_image(data, limits.max_pixels)
    header = read_header(image, data)
    scale = fit_scale(header, coarsest_scale(header), limits.capacity)
    with limits.reserve(decode_cost(header, scale)):
        digit = _decode_digit(image, scale)
        del image  # a WEBP decoder keeps a full-size canvas until its image object goes
        finer = scale
        if digit is not None and scale > 1 and max(digit.shape) < MIN_DIGIT_PIXELS:
            finer = _finer_scale(header, scale, max(digit.shape), limits.capacity)
        if finer == scale:
            return _to_mnist_field(digit)
    # A small digit in a big image: decode again with enough pixels for its strokes (the
    # first decode's memory is released; this one reserves its own).
    del digit
    with limits.reserve(decode_cost(header, finer)):
        return _to_mnist_field(_decode_digit(open_image(data, limits.max_pixels), finer))


def _decode_digit(image: Image.Image, scale: int) -> np.ndarray | None:
    """Decode at 1/scale and find the digit (None if the image is blank)."""
    grey, alpha = _grey_and_alpha(decode_reduced(image, scale))
    return _find_digit(grey, alpha)


def _finer_scale(header: Header, scale: int, digit_pixels: int, capacity: int) -> int:
    """The coarsest scale at which a digit now `digit_pixels` long reaches MIN_DIGIT_PIXELS.

    Never so fine that the working image passes MAX_WORK_PIXELS or the decode `capacity`.
    """
    while scale > 1 and digit_pixels < MIN_DIGIT_PIXELS:
        finer = scale // 2
        if work_pixels(header, finer) > MAX_WORK_PIXELS or decode_cost(header, finer) > capacity:
            break
        scale = finer
        digit_pixels *= 2
    return scale


def _grey_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Greyscale of the image composited onto white, plus its alpha channel if it has one.

    Both are uint8 (float32 only for 16-bit and float images): the float32 copy is made
    once, by `_ink`, so a large working image is not held as several float arrays.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.array(image, dtype=np.float32)  # a writable copy, changed in place below
        if values.max(initial=0.0) > 255.0:
            values /= 257.0  # 16-bit samples: 65535 maps to 255
        np.clip(values, 0.0, 255.0, out=values)
        return values, None
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        grey = image if image.mode == "L" else image.convert("L")  # no copy when already L
        return np.asarray(grey), None
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composite = Image.alpha_composite(white, rgba)
    del white  # each full-size temporary goes as soon as the next step has its pixels
    grey = composite.convert("L")
    del composite
    return np.asarray(grey), np.asarray(rgba.getchannel("A"))


def _find_digit(grey: np.ndarray, alpha: np.ndarray | None) -> np.ndarray | None:
    """Light-on-dark ink in [0, 1], cropped to its bounding box; None if there is no ink."""
    ink = _ink(grey)
    if ink is None and alpha is not None:
        # Light strokes on a transparent canvas vanish on white: the alpha is the drawing.
        ink = _ink(alpha)
    if ink is None:
        return None
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _ink(grey: np.ndarray) -> np.ndarray | None:
    """Map a grey image (uint8 or float32, 0-255) to ink strength in [0, 1] (background 0).

    None if it is blank. Integer greys give exactly the values their float32 copy would.
    """
    border = np.concatenate((grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]))
    background = float(np.median(border))
    if background > 127.5:
        # Dark ink on light paper: flip so the digit is light on dark, as in MNIST.
        ink: np.ndarray = np.subtract(255.0, grey, dtype=np.float32)
        background = 255.0 - background
    else:
        ink = grey.astype(np.float32)  # always a copy: the chain below works in place
    contrast = float(ink.max()) - background
    if contrast < MIN_CONTRAST:
        return None
    # In place, one array for the whole chain: on a canvas-sized upload the temporaries of
    # `clip((x - b) / c - floor) / (1 - floor)` cost more than the arithmetic. Same float32
    # operations in the same order, so the same values as the training pipeline's.
    ink -= background
    ink /= contrast
    # Paper texture, shading and JPEG noise sit in the bottom of the range: drop them.
    ink -= INK_FLOOR
    ink /= 1.0 - INK_FLOOR
    np.clip(ink, 0.0, 1.0, out=ink)
    if not ink.any():
        return None
    return ink


def _to_mnist_field(digit: np.ndarray | None) -> np.ndarray:
    """Scale the cropped digit's longer side to 20 px and centre its mass in a 28x28 field.

    Raises `BlankImage` if there is no digit.
    """
    if digit is None:
        raise BlankImage()
    height, width = digit.shape
    ratio = DIGIT_BOX / max(height, width)
    new_w = max(1, round(width * ratio))
    new_h = max(1, round(height * ratio))
    scaled = digit * 255.0
    np.round(scaled, out=scaled)
    patch_image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    patch = np.asarray(patch_image.resize((new_w, new_h), Image.Resampling.LANCZOS), np.float32)
    peak = float(patch.max())
    if peak <= 0.0:
        raise BlankImage()
    patch /= peak  # thin strokes scaled down from a big photo keep full intensity

    total = float(patch.sum())
    centre_y = float(patch.sum(axis=1) @ np.arange(new_h, dtype=np.float32)) / total
    centre_x = float(patch.sum(axis=0) @ np.arange(new_w, dtype=np.float32)) / total
    middle = (MNIST_SIZE - 1) / 2.0
    top = int(np.clip(round(middle - centre_y), 0, MNIST_SIZE - new_h))
    left = int(np.clip(round(middle - centre_x), 0, MNIST_SIZE - new_w))
    field = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    field[top : top + new_h, left : left + new_w] = patch
    return field


def normalize_digit(grey: np.ndarray) -> np.ndarray:
    """Run an already-decoded grey image (0-255, any polarity) through the same steps.

    Used by training on MNIST arrays so the model learns exactly what the service feeds it.
    Raises `BlankImage` if there is no ink.
    """
    return _to_mnist_field(_find_digit(np.asarray(grey, dtype=np.float32), None))
