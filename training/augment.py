"""Offline augmentation: distort a raw digit, then run the service's `normalize_digit` on it.

The distortions stand for what separates other people's digits from MNIST's: slant and
rotation, narrow or wide writing, thin or heavy pens, wobbly strokes, and printed fonts.
They are applied to a 2x upsampled canvas (72x72, the digit about 40 px long) so that the
smallest erosion thins a stroke by half an MNIST pixel, not a whole one. Position and
overall size are undone by `normalize_digit` (crop, scale to 20 px, centre of mass), so
shifts and zoom only move the resampling grid; the geometry that survives is rotation,
shear, aspect ratio, stroke thickness and the elastic wobble.

Everything here is NumPy, SciPy and Pillow (no TensorFlow), so it runs in worker processes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from mnist_api.errors import BlankImage
from mnist_api.imaging.preprocessing import normalize_digit

CANVAS = 72  # working canvas: MNIST's 28x28 padded to 36x36 and upsampled 2x
UPSAMPLE = 2
DIGIT_PIXELS = 40  # a digit's longer side on the canvas (MNIST's 20 px at 2x)


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random distortions (angles in degrees, lengths in canvas pixels)."""

    max_rotation: float = 15.0
    max_shear: float = 0.25  # tan of the slant angle, about +-14 degrees
    scale_range: tuple[float, float] = (0.85, 1.15)
    aspect_range: tuple[float, float] = (0.75, 1.3)  # width / height stretch
    max_shift: float = 4.0
    elastic_probability: float = 0.5
    elastic_points: int = 6  # random control points per side: fewer is smoother
    elastic_max_displacement: float = 3.0
    # Probabilities of erode / keep / dilate 3x3 / dilate 5x5 (thin pen ... marker).
    thickness_probabilities: tuple[float, float, float, float] = (0.15, 0.45, 0.25, 0.15)


DEFAULT_PARAMS = AugmentParams()

# 5x5 disc for the heaviest dilation (a square would make strokes look blocky).
_DISC5 = np.array(
    [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]],
    dtype=bool,
)


def mnist_canvas(image: np.ndarray) -> np.ndarray:
    """A raw 28x28 MNIST image (0-255, light on dark) padded and upsampled to the canvas."""
    pad = (CANVAS // UPSAMPLE - image.shape[0]) // 2
    padded = np.pad(np.asarray(image, dtype=np.float32), pad)
    return ndimage.zoom(padded, UPSAMPLE, order=1, grid_mode=True, mode="grid-constant")


def change_thickness(
    canvas: np.ndarray, rng: np.random.Generator, params: AugmentParams
) -> np.ndarray:
    """Thin or thicken the strokes by a grey-level erosion or dilation."""
    choice = rng.choice(4, p=params.thickness_probabilities)
    if choice == 0:
        thinner = ndimage.grey_erosion(canvas, size=(2, 2))
        # A faint, thin digit can vanish under erosion; keep the original then.
        return thinner if thinner.max() > 0.5 * canvas.max() else canvas
    if choice == 2:
        return ndimage.grey_dilation(canvas, size=(3, 3))
    if choice == 3:
        return ndimage.grey_dilation(canvas, footprint=_DISC5)
    return canvas


def warp(canvas: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Random affine map (rotation, shear, scale, aspect, shift) plus an optional elastic
    wobble, applied in one bilinear resampling so the strokes are blurred only once."""
    angle = np.deg2rad(rng.uniform(-params.max_rotation, params.max_rotation))
    shear = rng.uniform(-params.max_shear, params.max_shear)
    scale = rng.uniform(*params.scale_range)
    aspect = np.exp(rng.uniform(*np.log(params.aspect_range)))
    # Forward map in (x, y): rotate . shear . scale; output pixels look up its inverse.
    cos, sin = np.cos(angle), np.sin(angle)
    forward = (
        np.array([[cos, -sin], [sin, cos]])
        @ np.array([[1.0, shear], [0.0, 1.0]])
        @ np.diag([scale * np.sqrt(aspect), scale / np.sqrt(aspect)])
    )
    inverse = np.linalg.inv(forward)
    size = canvas.shape[0]
    centre = (size - 1) / 2.0
    ys, xs = _grid(size)
    shift = rng.uniform(-params.max_shift, params.max_shift, size=2)
    dx, dy = xs - centre - shift[0], ys - centre - shift[1]
    src_x = inverse[0, 0] * dx + inverse[0, 1] * dy + centre
    src_y = inverse[1, 0] * dx + inverse[1, 1] * dy + centre
    if rng.random() < params.elastic_probability:
        field_x, field_y = _displacement_fields(size, rng, params)
        src_x += field_x
        src_y += field_y
    warped = ndimage.map_coordinates(canvas, [src_y, src_x], order=1, mode="constant")
    return np.clip(warped, 0.0, 255.0)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (ys, xs) of a square image, cached: every warp needs them."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    return ys, xs


def _displacement_fields(size: int, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Smooth random x and y displacements with a random peak amplitude, shape (2, size, size).

    In the spirit of Simard et al. (2003), but instead of blurring full-size noise with a
    wide Gaussian, a few random control points are interpolated bicubically: the same kind
    of smooth wobble at a fraction of the cost.
    """
    points = rng.uniform(-1.0, 1.0, (2, params.elastic_points, params.elastic_points))
    weights = _upsampling_matrix(params.elastic_points, size)
    fields = weights @ points @ weights.T  # separable: rows, then columns
    peak = np.abs(fields).max(axis=(1, 2), keepdims=True)
    amplitude = rng.uniform(0.0, params.elastic_max_displacement, (2, 1, 1))
    return fields / np.maximum(peak, 1e-12) * amplitude


@functools.lru_cache(maxsize=4)
def _upsampling_matrix(points: int, size: int) -> np.ndarray:
    """(size, points) matrix of Pillow's bicubic resize weights, from resizing unit impulses."""
    impulses = np.eye(points, dtype=np.float32)
    columns = [
        np.asarray(Image.fromarray(row[None, :]).resize((size, 1), Image.Resampling.BICUBIC))[0]
        for row in impulses
    ]
    return np.stack(columns, axis=1).astype(np.float64)


def augment_canvas(
    canvas: np.ndarray, rng: np.random.Generator, params: AugmentParams = DEFAULT_PARAMS
) -> np.ndarray:
    """Distort a canvas and return what the service would feed the model: (28, 28) [0, 1]."""
    distorted = warp(change_thickness(canvas, rng, params), rng, params)
    try:
        return normalize_digit(distorted)
    except BlankImage:  # only if a distortion wiped the ink out; fall back to the original
        return normalize_digit(canvas)


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in scalable font (Aileron Regular) at a pixel size."""
    return ImageFont.load_default(size=size)


def printed_canvas(digit: int, rng: np.random.Generator) -> np.ndarray:
    """A printed digit in Pillow's built-in font, regular to bold, on the canvas (0-255)."""
    size = int(rng.integers(28, 64))
    # Stroke widths give regular, semi-bold and bold weights of the one built-in font.
    stroke = int(rng.choice([0, 0, 1, 2])) * size // 32
    side = 2 * size
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    draw.text(
        (side / 2, side / 2),
        str(digit),
        fill=255,
        font=_font(size),
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    return _fit_canvas(np.asarray(image, dtype=np.float32))


def _fit_canvas(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink, scale the longer side to DIGIT_PIXELS and centre on the canvas."""
    rows = np.flatnonzero(ink.max(axis=1) > 0)
    cols = np.flatnonzero(ink.max(axis=0) > 0)
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    ratio = DIGIT_PIXELS / max(crop.shape)
    width = max(1, round(crop.shape[1] * ratio))
    height = max(1, round(crop.shape[0] * ratio))
    patch = Image.fromarray(crop.astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    top, left = (CANVAS - height) // 2, (CANVAS - width) // 2
    canvas[top : top + height, left : left + width] = np.asarray(patch, dtype=np.float32)
    return canvas


def augment_mnist(canvases: np.ndarray, seed: int) -> np.ndarray:
    """Augmented and normalised copies (n, 28, 28) of MNIST canvases, one per canvas."""
    rng = np.random.default_rng(seed)
    return np.stack([augment_canvas(canvas, rng) for canvas in canvases])


def augment_printed(labels: np.ndarray, seed: int) -> np.ndarray:
    """Augmented and normalised printed digits (n, 28, 28), one per label."""
    rng = np.random.default_rng(seed)
    return np.stack([augment_canvas(printed_canvas(int(label), rng), rng) for label in labels])
