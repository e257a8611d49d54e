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
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_api.errors import BlankImage, ImageTooLarge, InvalidImage, UnsupportedMediaType

# The kinds a client may send, decided from the bytes (Pillow's own sniffing), never the name.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")

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

# Work at no more than this many pixels on the shorter side: enough for a digit that fills a
# fifth of a photo to keep ~50 px, and it lets a 12-megapixel JPEG decode at 1/8 scale.
WORK_SHORT_SIDE = 256
# A digit found smaller than this (longer side, in working pixels) is decoded again at a
# finer scale, so a small digit in a large photo keeps its strokes.
MIN_DIGIT_PIXELS = 48
# Ink must stand this far (0-255) above the background, else the image counts as blank.
MIN_CONTRAST = 24.0
# Fraction of the ink contrast below which a pixel is background (paper texture, JPEG noise).
INK_FLOOR = 0.25


@dataclass(frozen=True)
class Limits:
    """Caps applied while decoding an upload."""

    max_pixels: int = 50_000_000


def preprocess(data: bytes, limits: Limits | None = None) -> np.ndarray:
    """Decode an upload and return the model's input: float32 (28, 28) in [0, 1], ink = 1.

    Raises `InvalidImage`, `UnsupportedMediaType`, `ImageTooLarge` or `BlankImage`.
    """
    limits = limits or Limits()
    image = open_image(data, limits)
    scale = _coarsest_scale(image.size)
    grey, alpha = _decode_grey(image, scale)
    digit = _find_digit(grey, alpha)
    if digit is not None and scale > 1 and max(digit.shape) < MIN_DIGIT_PIXELS:
        # A small digit in a big image: decode again with enough pixels for its strokes.
        finer = _finer_scale(scale, max(digit.shape))
        grey, alpha = _decode_grey(open_image(data, limits), finer)
        digit = _find_digit(grey, alpha)
    if digit is None:
        raise BlankImage()
    return _to_mnist_field(digit)


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Identify the image kind from its bytes and check its pixel count from the header.

    Nothing is decoded here: Pillow reads only the header, so a decompression bomb is
    refused before it costs memory.
    """
    if not data:
        raise InvalidImage()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge() from exc
    except UnidentifiedImageError as exc:
        if _is_known_other_kind(data):
            raise UnsupportedMediaType() from exc
        raise InvalidImage() from exc
    except Exception as exc:  # a malformed header can raise almost anything inside Pillow
        raise InvalidImage() from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage()
    if width * height > limits.max_pixels:
        raise ImageTooLarge()
    return image


def _is_known_other_kind(data: bytes) -> bool:
    """True for readable files of a kind the service does not take (PDF, SVG, TIFF, ...)."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"%PDF-"):
        return True
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096]:
        return True
    if data[4:8] == b"ftyp":  # HEIC, AVIF and other ISO media files
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data))  # any format Pillow knows: TIFF, ICO, PSD, ...
    except Exception:
        return False
    return True


def _coarsest_scale(size: tuple[int, int]) -> int:
    """The largest power-of-two reduction that keeps the shorter side >= WORK_SHORT_SIDE."""
    short = min(size)
    scale = 1
    while scale < 8 and short // (scale * 2) >= WORK_SHORT_SIDE:
        scale *= 2
    return scale


def _finer_scale(scale: int, digit_pixels: int) -> int:
    """The coarsest scale at which a digit now `digit_pixels` long reaches MIN_DIGIT_PIXELS."""
    while scale > 1 and digit_pixels < MIN_DIGIT_PIXELS:
        scale //= 2
        digit_pixels *= 2
    return scale


def _decode_grey(image: Image.Image, scale: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode at 1/scale, upright, transparency on white; return grey (and alpha) as float32."""
    full_width = image.width
    try:
        if scale > 1 and image.format == "JPEG":
            # DCT-domain scaling straight to greyscale: a 12 MP photo decodes in a few ms.
            image.draft("L", (image.width // scale, image.height // scale))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            remaining = scale // max(1, round(full_width / image.width))
            if remaining > 1:
                # Box-average whatever draft mode did not reduce (and non-JPEG images).
                image = _reducible(image).reduce(remaining)
            if _may_be_rotated(image):
                image = ImageOps.exif_transpose(image)
            return _grey_and_alpha(image)
    except Exception as exc:  # truncated data and decoder faults are the client's file
        raise InvalidImage() from exc


def _may_be_rotated(image: Image.Image) -> bool:
    """True if the file carries EXIF or XMP metadata (where an orientation tag could be)."""
    return any(key in image.info for key in ("exif", "xmp", "XML:com.adobe.xmp"))


def _reducible(image: Image.Image) -> Image.Image:
    """Convert the few modes `Image.reduce` refuses (bilevel, palette, 16-bit) first."""
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")
    return image


def _grey_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Greyscale of the image composited onto white, plus its alpha channel if it has one."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float32)
        if values.max(initial=0.0) > 255.0:
            values = values / 257.0  # 16-bit samples: 65535 maps to 255
        return np.clip(values, 0.0, 255.0), None
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        grey = image if image.mode == "L" else image.convert("L")  # no copy when already L
        return np.asarray(grey, dtype=np.float32), None
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    grey = Image.alpha_composite(white, rgba).convert("L")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)
    return np.asarray(grey, dtype=np.float32), alpha


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
    """Map a grey image to ink strength in [0, 1] (background 0), or None if it is blank."""
    border = np.concatenate((grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]))
    background = float(np.median(border))
    if background > 127.5:
        # Dark ink on light paper: flip so the digit is light on dark, as in MNIST.
        ink: np.ndarray = np.subtract(255.0, grey)
        background = 255.0 - background
    else:
        ink = grey.copy()
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


def _to_mnist_field(digit: np.ndarray) -> np.ndarray:
    """Scale the cropped digit's longer side to 20 px and centre its mass in a 28x28 field."""
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
    digit = _find_digit(np.asarray(grey, dtype=np.float32), None)
    if digit is None:
        raise BlankImage()
    return _to_mnist_field(digit)


def warm_up_upload() -> bytes:
    """A small PNG of a stroke: decoding it once loads Pillow's plugins before real traffic."""
    image = Image.new("L", (32, 32), 255)
    image.paste(0, (14, 4, 18, 28))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
