"""Turn uploaded image bytes into the 28x28 array the model was trained on.

Pure functions, bytes in and a NumPy array out, no Flask. The steps follow how MNIST itself
was made (see the contract's "Preprocessing"): decode, apply the EXIF orientation, composite
transparency onto white, greyscale, make the digit light on dark, crop to the ink, scale the
longer side to 20 px, paste into 28x28 and move the centre of mass to the centre.

`train_model.py` runs its training images through `normalize_digit`, the same function the
service uses, so what the model sees at serving time is what it saw in training.
"""

from __future__ import annotations

import io
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mnist_api.errors import BlankImage
from mnist_api.imaging.budget import DecodeBudget
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

# Raw-body Content-Types accepted by /predict; the bytes still decide the real kind.
ALLOWED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/gif",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
    }
)

MNIST_SIZE = 28
DIGIT_BOX = 20  # MNIST scaled each digit's longer side to 20 px inside the 28x28 field.

# A digit found smaller than this (longer side, in working pixels) is decoded again at a
# finer scale, so a small digit in a large photo keeps its strokes.
MIN_DIGIT_PIXELS = 48
# Ink must stand this far (0-255) above the background, else the image counts as blank.
MIN_CONTRAST = 24.0
# Fraction of the ink contrast below which a pixel is background (paper texture, JPEG noise).
INK_FLOOR = 0.25
# Every value an 8-bit pixel can take: `_crop_ink_of_bytes` computes the ink of each once.
_BYTE_VALUES = np.arange(256, dtype=np.uint8)


@dataclass(frozen=True)
class Limits:
    """Caps applied while decoding an upload."""

    max_pixels: int = 50_000_000
    # The process's memory budget for decodes (the app gives every worker one); None leaves
    # decodes unbounded (tests, training, tools).
    budget: DecodeBudget | None = None

    @property
    def capacity(self) -> int:
        """The most bytes one decode may cost."""
        return self.budget.capacity if self.budget is not None else sys.maxsize

    def reserve(self, cost: int) -> AbstractContextManager[None]:
        """Hold `cost` bytes of the budget while decoding (see `DecodeBudget.reserve`)."""
        return self.budget.reserve(cost) if self.budget is not None else nullcontext()


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
    """The digit as 8-bit light-on-dark ink, cropped to its bounding box; None if no ink.

    The ink strength in [0, 1] is kept as round(ink * 255) in a uint8 array: the form the
    resize in `_to_mnist_field` takes.
    """
    digit = _crop_ink(grey)
    if digit is None and alpha is not None:
        # Light strokes on a transparent canvas vanish on white: the alpha is the drawing.
        digit = _crop_ink(alpha)
    return digit


def _crop_ink(grey: np.ndarray) -> np.ndarray | None:
    """`_ink` of a grey image, cropped to the ink and as 8-bit (see `_find_digit`)."""
    if grey.dtype == np.uint8:
        return _crop_ink_of_bytes(grey)
    # 16-bit and float images, and training's float arrays: the float32 chain on every pixel.
    ink = _ink(grey)
    if ink is None:
        return None
    box = _bounding_box(ink)
    assert box is not None, "_ink returns None when there is no ink"
    return _to_bytes(ink[box])


def _crop_ink_of_bytes(grey: np.ndarray) -> np.ndarray | None:
    """`_crop_ink` for a uint8 image (the usual upload), without a float copy of its pixels.

    A pixel's ink depends only on its grey value, so `_ink`'s float32 chain runs once on
    the 256 possible values (a lookup table) and the pixels are looked up. Same float32
    operations on the same values: the same results as running the chain on every pixel,
    at a fraction of the cost on a canvas-sized upload (most of which is background).
    """
    background = _border_median(grey)
    ink_by_grey, ink_background = _light_on_dark(_BYTE_VALUES, background)
    # The chain keeps the order of the values (each float32 step is monotonic): ink grows
    # with darkness on light paper and with lightness on dark paper. So the strongest ink,
    # the `ink.max()` of `_ink`, is the entry of the image's darkest (or lightest) pixel,
    # and the inked pixels are those at or beyond the grey of the weakest ink.
    dark_ink = background > 127.5
    strongest = ink_by_grey[grey.min() if dark_ink else grey.max()]
    contrast = float(strongest) - ink_background
    if contrast < MIN_CONTRAST:
        return None
    _scale_ink(ink_by_grey, ink_background, contrast)
    inked = np.flatnonzero(ink_by_grey)  # the grey values that are ink, a contiguous run
    if inked.size == 0:
        return None
    weakest = int(inked[-1] if dark_ink else inked[0])  # a Python int keeps the test uint8
    box = _bounding_box(grey <= weakest if dark_ink else grey >= weakest)
    if box is None:
        return None  # no pixel is dark (light) enough to count as ink
    # np.take: about twice as fast as indexing, `_to_bytes(ink_by_grey)[grey[box]]`.
    return np.take(_to_bytes(ink_by_grey), grey[box])


def _ink(grey: np.ndarray) -> np.ndarray | None:
    """Map a grey image (uint8 or float32, 0-255) to ink strength in [0, 1] (background 0).

    None if it is blank. Integer greys give exactly the values their float32 copy would.
    """
    ink, background = _light_on_dark(grey, _border_median(grey))
    contrast = float(ink.max()) - background
    if contrast < MIN_CONTRAST:
        return None
    _scale_ink(ink, background, contrast)
    if not ink.any():
        return None
    return ink


def _border_median(grey: np.ndarray) -> float:
    """The median grey of the image's outermost rows and columns: its background."""
    border = np.concatenate((grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]))
    if border.dtype != np.uint8:
        return float(np.median(border))
    # np.median's own overhead is most of its cost here (~10 us a call). For 8-bit values
    # this is the same number: the border has an even count (each side twice over), and
    # np.median averages its two middle values in float64, exactly, like this.
    half = border.size // 2
    low, high = np.partition(border, (half - 1, half))[half - 1 : half + 1]
    return (float(low) + float(high)) / 2.0


def _light_on_dark(grey: np.ndarray, background: float) -> tuple[np.ndarray, float]:
    """A float32 copy of the greys with the digit light on dark, and the background's value."""
    if background > 127.5:
        # Dark ink on light paper: flip so the digit is light on dark, as in MNIST.
        return np.subtract(255.0, grey, dtype=np.float32), 255.0 - background
    return grey.astype(np.float32), background  # always a copy: `_scale_ink` works in place


def _scale_ink(ink: np.ndarray, background: float, contrast: float) -> None:
    """Map light-on-dark float32 greys, in place, to ink strength in [0, 1] (background 0)."""
    # In place, one array for the whole chain: on a canvas-sized upload the temporaries of
    # `clip((x - b) / c - floor) / (1 - floor)` cost more than the arithmetic. Same float32
    # operations in the same order, so the same values as the training pipeline's.
    ink -= background
    ink /= contrast
    # Paper texture, shading and JPEG noise sit in the bottom of the range: drop them.
    ink -= INK_FLOOR
    ink /= 1.0 - INK_FLOOR
    np.clip(ink, 0.0, 1.0, out=ink)


def _bounding_box(ink: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns spanning the nonzero pixels (None if there are none)."""
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(ink.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _to_bytes(ink: np.ndarray) -> np.ndarray:
    """Ink strength in [0, 1] as 0-255 uint8, rounded to nearest."""
    scaled = ink * 255.0
    np.round(scaled, out=scaled)
    return scaled.astype(np.uint8)


def _to_mnist_field(digit: np.ndarray | None) -> np.ndarray:
    """Scale the cropped 8-bit digit's longer side to 20 px and centre its mass in 28x28.

    Raises `BlankImage` if there is no digit.
    """
    if digit is None:
        raise BlankImage()
    height, width = digit.shape
    ratio = DIGIT_BOX / max(height, width)
    new_w = max(1, round(width * ratio))
    new_h = max(1, round(height * ratio))
    patch_image = Image.fromarray(digit)  # a 2-D uint8 array: mode L
    patch = np.asarray(patch_image.resize((new_w, new_h), Image.Resampling.LANCZOS), np.float32)
    peak = float(patch.max())
    if peak <= 0.0:
        raise BlankImage()
    patch /= peak  # thin strokes scaled down from a big photo keep full intensity

    total = float(patch.sum())
    centre_y = float(patch.sum(axis=1) @ np.arange(new_h, dtype=np.float32)) / total
    centre_x = float(patch.sum(axis=0) @ np.arange(new_w, dtype=np.float32)) / total
    middle = (MNIST_SIZE - 1) / 2.0
    # Plain int min/max: np.clip on a Python scalar costs ~5 us a call, for the same int.
    top = min(max(round(middle - centre_y), 0), MNIST_SIZE - new_h)
    left = min(max(round(middle - centre_x), 0), MNIST_SIZE - new_w)
    field = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    field[top : top + new_h, left : left + new_w] = patch
    return field


def normalize_digit(grey: np.ndarray) -> np.ndarray:
    """Run an already-decoded grey image (0-255, any polarity) through the same steps.

    Used by training on MNIST arrays so the model learns exactly what the service feeds it.
    Raises `BlankImage` if there is no ink.
    """
    return _to_mnist_field(_find_digit(np.asarray(grey, dtype=np.float32), None))


def warm_up_upload() -> bytes:
    """A small PNG of a stroke: decoding it once loads Pillow's plugins before real traffic."""
    image = Image.new("L", (32, 32), 255)
    image.paste(0, (14, 4, 18, 28))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
