"""The training data, epoch by epoch: a fresh augmented copy of every training image plus a
few printed digits, computed ahead in worker processes while the model trains.

Every chunk of every epoch has its own seed derived from (seed, epoch, chunk), so the data
do not depend on the number of workers and a rerun with the same seed sees the same images.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import numpy as np

from training.architectures import NUM_CLASSES
from training.augment import augment_mnist, augment_printed

CHUNK = 250  # images per augmentation task: small enough to keep both workers busy

Epoch = tuple[np.ndarray, np.ndarray]  # (images (n, 28, 28), labels (n,))


def augmented_epochs(
    canvases: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    printed_per_class: int,
    seed: int,
    workers: int,
) -> Iterator[Epoch]:
    """Yield, epoch by epoch, a fresh augmented copy of every image plus the printed digits.

    `workers` processes compute ahead while the model trains on the epochs already yielded,
    so augmentation mostly hides behind training. MNIST rows come first, in their original
    order (so a mask over the training rows selects them), then the printed digits.
    """
    printed_labels = np.repeat(np.arange(NUM_CLASSES), printed_per_class)
    starts = range(0, len(canvases), CHUNK)
    tasks = [
        (kind, epoch, start, seed)
        for epoch in range(epochs)
        for kind, start in [*[("mnist", start) for start in starts], ("printed", 0)]
    ]
    # Fork: the workers inherit the canvases instead of receiving them pickled, they run only
    # NumPy/SciPy/Pillow code, and TensorFlow has not started any work yet.
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_share, initargs=(canvases, printed_labels)) as pool:
        results = pool.imap(_augment_task, tasks)  # in task order, computed ahead
        epoch_labels = np.concatenate([labels, printed_labels])
        for _ in range(epochs):
            images = [next(results) for _ in range(len(starts) + 1)]
            yield np.concatenate(images), epoch_labels


_SHARED: dict[str, np.ndarray] = {}


def _share(canvases: np.ndarray, printed_labels: np.ndarray) -> None:
    """Pool initializer: keep the (forked, not pickled) inputs where the tasks find them."""
    _SHARED["canvases"] = canvases
    _SHARED["printed_labels"] = printed_labels


def _augment_task(task: tuple[str, int, int, int]) -> np.ndarray:
    """One chunk of MNIST canvases, or one epoch's printed digits (runs in a worker)."""
    kind, epoch, start, seed = task
    stream = 0 if kind == "mnist" else 1
    chunk_seed = int(np.random.SeedSequence([seed, epoch, stream, start]).generate_state(1)[0])
    if kind == "mnist":
        return augment_mnist(_SHARED["canvases"][start : start + CHUNK], chunk_seed)
    labels = _SHARED["printed_labels"]
    if not len(labels):
        return np.zeros((0, 28, 28), dtype=np.float32)
    return augment_printed(labels, chunk_seed)


class EpochCache:
    """The epochs of a run, computed once and kept, for every network the run trains.

    Epochs are drawn from the augmentation stream only when a fit first asks for them, so
    the first network trains while the workers compute ahead. Kept as float16 (its step near
    1.0 is 1/2048, an eighth of a grey level, far below what the model resolves): 80 epochs
    of 4,300 images take 0.5 GB instead of 1.1. Every fit, the first one too, sees the
    stored copy.
    """

    def __init__(self, stream: Iterator[Epoch], total: int) -> None:
        self._stream = stream
        self._store: list[Epoch] = []
        self.total = total

    def get(self, index: int) -> Epoch:
        """Epoch `index` (0-based, below `total`), computed if not yet drawn."""
        while len(self._store) <= index:
            images, labels = next(self._stream)
            self._store.append((images.astype(np.float16), labels))
            if len(self._store) == self.total:
                self._stream.close()  # every epoch is here: let the worker pool go
        return self._store[index]

    def sequence(self, count: int, offset: int = 0) -> Iterator[Epoch]:
        """`count` epochs starting at `offset`, wrapping around: teachers that start at
        different offsets see the same images in a different order of epochs."""
        for epoch in range(count):
            yield self.get((offset + epoch) % self.total)


def select(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the MNIST rows flagged in `keep`, and every printed digit appended after them."""
    mask = np.concatenate([keep, np.ones(len(y) - len(keep), dtype=bool)])
    return x[mask], y[mask]
