"""Open an upload, decide how small to decode it, and decode it holding as little as possible.

Three steps, so that memory is known before it is spent: `open_image` reads only the header
(kind and size), `read_header` + `decode_cost` estimate the peak bytes the decode will hold
(`mnist_api.imaging.budget` reserves them), and `decode_reduced` decodes.

How the decode keeps memory down: JPEGs decode straight at 1/2, 1/4 or 1/8 scale (libjpeg's
DCT scaling). Other formats have no reduced decode in Pillow, so they decode once at full
size in their own mode (a palette image stays one byte per pixel) and are reduced at once;
the conversions that Pillow's box reduction needs first (palette to RGBA, 1-bit to grey,
16-bit to 32-bit, and the premultiplied alpha Pillow uses to reduce RGBA) run on bands of a
few hundred rows, never on a second full-size copy. The full-size pixels are freed as soon
as the reduced image exists.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_api.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType

# The kinds a client may send, decided from the bytes (Pillow's own sniffing), never the name.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")

# Work at no more than this many pixels on the shorter side: enough for a digit that fills a
# fifth of a photo to keep ~50 px, and it lets a 12-megapixel JPEG decode at 1/8 scale.
WORK_SHORT_SIDE = 256
# Nor at more than this many pixels in all: only images with an extreme aspect ratio (a long
# strip) or a tiny digit in a huge photo reach it; their working copies stay bounded.
MAX_WORK_PIXELS = 4_000_000
# libjpeg scales the DCT by at most 1/8.
MAX_DRAFT_SCALE = 8
# Conversions before a box reduction run on bands of about this many pixels.
BAND_PIXELS = 1 << 18

# What the decode path holds, in bytes, measured (tests/imaging/test_decoding.py checks that the
# estimate stays above the peak really measured for every kind of file):
# - per pixel of the reduced working image: the image, its greyscale, the float32 ink and
#   the cropped digit; with transparency (or 16 bits) also its RGBA, white-composited and
#   alpha copies (or 32-bit and float copies);
WORK_BYTES_PER_PIXEL = 10
WORK_BYTES_PER_PIXEL_ALPHA = 16
# - per pixel of a band being converted: the band, its converted and premultiplied copies;
BAND_BYTES_PER_PIXEL = 13
# - a WEBP holds about five full-size RGBA copies while it loads (libwebp's decode buffers
#   and canvas, the frame bytes Pillow copies out, Pillow's image): measured 16 bytes per
#   pixel for most files, 18.8 for a lossless one full of noise;
WEBP_BYTES_PER_PIXEL = 19
# - a progressive or multi-scan JPEG keeps every DCT coefficient (2 bytes per sample at full
#   resolution, whatever the output scale) until its last scan is read;
JPEG_COEFFICIENT_BYTES = 2
# - a run-length encoded BMP is expanded by Pillow in Python: a growing bytearray of one byte
#   per pixel, then a bytes copy of it (measured: 2 bytes per pixel besides the image);
BMP_RLE_BYTES_PER_PIXEL = 3
BMP_RLE_COMPRESSIONS = (1, 2)  # BI_RLE8, BI_RLE4
# - and a fixed allowance for the decoder's own state and row buffers.
DECODER_OVERHEAD = 1 << 20

# Modes that Pillow's `Image.reduce` takes as they are (no conversion, no premultiplication).
_REDUCIBLE_AS_IS = frozenset({"L", "RGB", "I", "F", "CMYK", "YCbCr", "LAB", "HSV"})
# Modes JPEG's draft mode decodes straight to one-byte greyscale.
_DRAFTS_TO_GREY = frozenset({"L", "RGB", "YCbCr"})


@dataclass(frozen=True)
class Header:
    """What decoding an image will cost depends on; read from its header, nothing decoded."""

    width: int
    height: int
    mode: str
    format: str
    # Bytes the decoder holds besides the image: a progressive or multi-scan JPEG's
    # coefficients, a run-length BMP's buffers (else 0).
    decoder_bytes: int = 0
    # Transparent pixels (a palette or colour key): it is composited like an RGBA image.
    transparency: bool = False


def open_image(data: bytes, max_pixels: int) -> Image.Image:
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
    if width * height > max_pixels:
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


def read_header(image: Image.Image, data: bytes) -> Header:
    """The facts `decode_cost` needs, taken from an opened (not yet decoded) image."""
    width, height = image.size
    decoder_bytes = 0
    if image.format == "JPEG" and _jpeg_keeps_coefficients(image, data):
        decoder_bytes = _jpeg_coefficient_bytes(image)
    if image.format == "BMP" and image.info.get("compression") in BMP_RLE_COMPRESSIONS:
        decoder_bytes = width * height * BMP_RLE_BYTES_PER_PIXEL
    transparency = "transparency" in image.info
    return Header(width, height, image.mode, image.format or "", decoder_bytes, transparency)


def work_pixels(header: Header, scale: int) -> int:
    """Pixels of the working image when decoding at 1/scale."""
    return math.ceil(header.width / scale) * math.ceil(header.height / scale)


def decode_cost(header: Header, scale: int) -> int:
    """Peak bytes that decoding at 1/scale and preprocessing the result will hold."""
    width, height = header.width, header.height
    decoded_mode = header.mode
    remaining = scale  # the box reduction left after the decoder's own scaling
    if header.format == "JPEG":
        draft = min(scale, MAX_DRAFT_SCALE)
        remaining = scale // draft
        if draft > 1 and header.mode in _DRAFTS_TO_GREY:
            decoded_mode = "L"
        decoded = math.ceil(width / draft) * math.ceil(height / draft) * _stored_bytes(decoded_mode)
    elif header.format == "WEBP":
        decoded = width * height * WEBP_BYTES_PER_PIXEL
    else:
        decoded = width * height * _stored_bytes(decoded_mode)
    decoded += header.decoder_bytes
    bands = 0
    if remaining > 1 and decoded_mode not in _REDUCIBLE_AS_IS:
        bands = band_rows(width, remaining) * width * BAND_BYTES_PER_PIXEL
    work = work_pixels(header, scale) * _work_bytes_per_pixel(header)
    return DECODER_OVERHEAD + decoded + bands + work


def coarsest_scale(header: Header) -> int:
    """The reduction to decode at first: shorter side >= WORK_SHORT_SIDE, at most 1/8.

    Coarser only if the working image would exceed MAX_WORK_PIXELS.
    """
    short = min(header.width, header.height)
    scale = 1
    while scale < MAX_DRAFT_SCALE and short // (scale * 2) >= WORK_SHORT_SIDE:
        scale *= 2
    while work_pixels(header, scale) > MAX_WORK_PIXELS:
        scale *= 2
    return scale


def fit_scale(header: Header, scale: int, capacity: int) -> int:
    """`scale`, or a coarser one if that brings the cost within `capacity` bytes.

    Coarser stops helping once the full-size decode dominates; what is left over the
    capacity is then refused by the budget.
    """
    cost = decode_cost(header, scale)
    while cost > capacity:
        coarser = decode_cost(header, scale * 2)
        if coarser >= cost:
            break
        scale, cost = scale * 2, coarser
    return scale


def band_rows(width: int, factor: int) -> int:
    """Rows per band for a reduction by `factor`: a multiple of it, about BAND_PIXELS."""
    return max(factor, BAND_PIXELS // max(1, width) // factor * factor)


def decode_reduced(image: Image.Image, scale: int) -> Image.Image:
    """Decode an opened image at 1/scale, upright; its full-size pixels are freed after.

    Raises `InvalidImage` for truncated data and decoder faults.
    """
    full_width = image.width
    try:
        if scale > 1 and image.format == "JPEG":
            # DCT-domain scaling straight to greyscale: a 12 MP photo decodes in a few ms.
            image.draft("L", (max(1, image.width // scale), max(1, image.height // scale)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            remaining = scale // max(1, round(full_width / image.width))
            if remaining > 1:
                # Box-average whatever draft mode did not reduce (and non-JPEG images).
                reduced = _reduce(image, remaining)
                image.close()  # the full-size pixels are not needed any more
                image = reduced
            if _may_be_rotated(image):
                image = ImageOps.exif_transpose(image)
            return image
    except Exception as exc:  # truncated data and decoder faults are the client's file
        raise InvalidImage() from exc


def _reduce(image: Image.Image, factor: int) -> Image.Image:
    """`Image.reduce`, with any conversion it needs first done band by band.

    Same pixels as converting the whole image and reducing it: the bands are whole multiples
    of `factor` rows, so every box of the reduction lies inside one band.
    """
    if image.mode in _REDUCIBLE_AS_IS:
        return image.reduce(factor)
    width, height = image.size
    rows = band_rows(width, factor)
    reduced: Image.Image | None = None
    for top in range(0, height, rows):
        band = _reducible(image.crop((0, top, width, min(height, top + rows)))).reduce(factor)
        if reduced is None:
            reduced = Image.new(band.mode, (math.ceil(width / factor), math.ceil(height / factor)))
            reduced.info = band.info  # what a whole-image reduction would carry (EXIF, ...)
        reduced.paste(band, (0, top // factor))
    assert reduced is not None, "an opened image has at least one row"
    return reduced


def _reducible(image: Image.Image) -> Image.Image:
    """Convert the few modes `Image.reduce` refuses (bilevel, palette, 16-bit) first."""
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")
    return image


def _may_be_rotated(image: Image.Image) -> bool:
    """True if the file carries EXIF or XMP metadata (where an orientation tag could be)."""
    return any(key in image.info for key in ("exif", "xmp", "XML:com.adobe.xmp"))


def _work_bytes_per_pixel(header: Header) -> int:
    """What preprocessing holds per working pixel: more with alpha or 16-bit samples."""
    costly = header.transparency or header.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if costly or header.mode.startswith(("I", "F")):
        return WORK_BYTES_PER_PIXEL_ALPHA
    return WORK_BYTES_PER_PIXEL


def _stored_bytes(mode: str) -> int:
    """Bytes Pillow stores per pixel of `mode` (RGB and LA take 4, like RGBA)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _jpeg_keeps_coefficients(image: Image.Image, data: bytes) -> bool:
    """True if libjpeg must buffer the whole image's coefficients: progressive or multi-scan.

    A baseline JPEG whose first scan does not hold every component is read scan by scan
    like a progressive one; the first SOS marker tells.
    """
    if image.info.get("progressive") or image.info.get("progression"):
        return True
    components = getattr(image, "layers", 0)
    position = 2  # after SOI
    while position + 4 < len(data):
        if data[position] != 0xFF:
            return True  # not where a marker should be: assume the costly case
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xDA:  # start of scan: how many components does it hold?
            return data[position + 4] < components
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return True


def _jpeg_coefficient_bytes(image: Image.Image) -> int:
    """Bytes of the whole-image DCT coefficient buffers, from the components' sampling."""
    layers: list[tuple[int, int, int, int]] = getattr(image, "layer", [])
    if not layers:
        return image.width * image.height * 4 * JPEG_COEFFICIENT_BYTES
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    # Coefficient rows and columns are whole MCUs (8 x sampling factor pixels).
    mcu_columns = math.ceil(image.width / (8 * h_max))
    mcu_rows = math.ceil(image.height / (8 * v_max))
    blocks = sum(mcu_columns * h * mcu_rows * v for _, h, v, _ in layers)
    return blocks * 64 * JPEG_COEFFICIENT_BYTES
