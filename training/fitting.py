"""Fitting one network on the augmented epochs: seeds, optimiser schedule, the epoch loop,
and the distillation loss a student learns from its teachers' softened answers.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras
import tensorflow as tf

from training.architectures import NUM_CLASSES
from training.epochs import Epoch, select

# Soft targets for a batch of images (n, 28, 28) -> (n, 10) probabilities, or None.
Targets = Callable[[np.ndarray], np.ndarray]


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


@dataclass(frozen=True)
class Distillation:
    """How a student learns from its teachers (Hinton et al., 2015).

    The loss is `hard_weight` x cross-entropy with the true label plus (1 - hard_weight) x
    temperature^2 x cross-entropy with the teachers' mean probabilities at `temperature`.
    """

    temperature: float
    hard_weight: float


def set_seeds(seed: int) -> None:
    """Make a run repeatable: Python, NumPy, TensorFlow seeds and deterministic TF kernels."""
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    # Costs nothing measurable for these small CNNs on CPU, and makes reruns bit-identical.
    tf.config.experimental.enable_op_determinism()


def schedule(learning_rate: float, steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Short warm-up, then cosine decay to zero: training settles, and the last epoch is kept."""
    warmup = max(1, steps // 20)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate / 10,
        decay_steps=max(1, steps - warmup),
        warmup_target=learning_rate,
        warmup_steps=warmup,
    )


def distillation_loss(distill: Distillation) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The student's loss on packed targets: columns 0-9 the one-hot label, 10-19 the soft."""
    temperature, hard_weight = distill.temperature, distill.hard_weight

    def loss(packed: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        hard, soft = packed[:, :NUM_CLASSES], packed[:, NUM_CLASSES:]
        hard_loss = keras.losses.categorical_crossentropy(hard, logits, from_logits=True)
        soft_loss = keras.losses.categorical_crossentropy(
            soft, logits / temperature, from_logits=True
        )
        # temperature^2 keeps the soft term's gradients on the hard term's scale.
        return hard_weight * hard_loss + (1.0 - hard_weight) * temperature**2 * soft_loss

    return loss


def packed_accuracy(packed: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Top-1 accuracy against the one-hot half of packed targets (for the progress line)."""
    return keras.metrics.categorical_accuracy(packed[:, :NUM_CLASSES], logits)


def fit(
    data: Iterable[Epoch],
    keep: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray] | None,
    config: Config,
    build: Callable[[], keras.Model],
    *,
    seed: int,
    epochs: int,
    name: str = "model",
    teachers: Targets | None = None,
    distill: Distillation | None = None,
) -> tuple[keras.Model, float | None]:
    """Train a fresh network on the epochs' data restricted to the `keep` mask of MNIST rows.

    With `teachers` (and `distill`), the network is a student: each epoch's images are
    labelled with the teachers' softened probabilities as well as the true digit. Returns the
    model and its final validation accuracy (None without a validation set).
    """
    set_seeds(seed)
    model = build()
    rng = np.random.default_rng(seed)
    per_epoch = int(keep.sum()) + config.printed_per_class * NUM_CLASSES
    steps = epochs * -(-per_epoch // config.batch_size)
    optimizer = keras.optimizers.Adam(schedule(config.learning_rate, steps))
    if teachers is not None and distill is not None:
        model.compile(
            optimizer=optimizer, loss=distillation_loss(distill), metrics=[packed_accuracy]
        )
    else:
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    val_accuracy = None
    for epoch, (all_x, all_y) in enumerate(data):
        started = time.monotonic()
        x, y = select(all_x, all_y, keep)
        x = x.astype(np.float32)
        order = rng.permutation(len(y))  # our own seeded shuffle, so reruns match
        target: np.ndarray = y
        if teachers is not None:
            target = np.concatenate([np.eye(NUM_CLASSES, dtype=np.float32)[y], teachers(x)], axis=1)
        # A tf.data pipeline rather than NumPy arrays: Keras' array adapter logs a spurious
        # TensorFlow op-definition error on every fit() call.
        batches = tf.data.Dataset.from_tensor_slices((x[order, ..., None], target[order]))
        history = model.fit(batches.batch(config.batch_size), epochs=1, shuffle=False, verbose=0)
        metric = "packed_accuracy" if teachers is not None else "accuracy"
        line = (
            f"{name} epoch {epoch + 1:2d}/{epochs}  loss {history.history['loss'][0]:.4f}  "
            f"train acc {history.history[metric][0]:.4f}"
        )
        if validation is not None:
            val_accuracy = accuracy(model, *validation)
            line += f"  val acc {val_accuracy:.4f}"
        print(f"{line}  ({time.monotonic() - started:.0f} s)", flush=True)
    return model, val_accuracy


def logits_of(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """A Keras model's logits on normalised images (n, 28, 28), in batches of 500."""
    return np.concatenate(
        [
            np.asarray(model(images[i : i + 500, ..., None], training=False))
            for i in range(0, len(images), 500)
        ]
    )


def accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a Keras model on normalised images (n, 28, 28)."""
    return float(np.mean(np.argmax(logits_of(model, images), axis=1) == labels))


def ensemble_targets(models: list[keras.Model], temperature: float) -> Targets:
    """The teachers' mean probabilities at `temperature`: the student's soft targets."""

    def targets(images: np.ndarray) -> np.ndarray:
        probabilities = [
            keras.ops.convert_to_numpy(keras.ops.softmax(logits_of(m, images) / temperature))
            for m in models
        ]
        return np.mean(probabilities, axis=0).astype(np.float32)

    return targets


def without_optimizer(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """An uncompiled copy: the Adam state would triple the file, and nobody resumes from it."""
    copy = build()
    copy.set_weights(model.get_weights())
    return copy
