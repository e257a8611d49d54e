"""Train, quantise and score a challenger: the model side of `training/retrain.py`.

The recipe's pieces are the ones the project's scripts use, from `training/`: the CNN from
`training/architectures.py` (as `train_model.py` trains it), the int8 conversion and its
calibration set from `training/quantize.py` (as `quantize_model.py` runs it). A challenger
starts from the stable version's Keras weights (fine-tuning, so a short run keeps what
stable knows) unless there are none or `from_scratch` is asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras
import tensorflow as tf

from mnist_api.inference.model import DigitModel
from training.architectures import RECIPES
from training.augment import augment_mnist, mnist_canvas
from training.feedback_data import FeedbackSplit
from training.quantize import calibration_images, convert

KERAS_FILE = "mnist_cnn.keras"


@dataclass(frozen=True)
class TrainingPlan:
    """How the challenger is trained."""

    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    fine_tune_learning_rate: float = 3e-4
    scratch_learning_rate: float = 2e-3
    augment: bool = True
    calibration_samples: int = 400


def starting_model(stable_dir: Path, from_scratch: bool) -> tuple[keras.Model, str]:
    """The model to train and how it started: stable's weights, or a fresh network of
    stable's recipe (its card's `training.recipe`; `v1` for cards from before recipes)."""
    keras_path = stable_dir / KERAS_FILE
    if not from_scratch and keras_path.is_file():
        model = keras.models.load_model(keras_path, compile=False)
        return model, f"fine-tuned from {stable_dir.name}"
    reason = "asked for" if from_scratch else f"no {KERAS_FILE} next to {stable_dir.name}"
    recipe = _recipe_of(stable_dir)
    return RECIPES[recipe].build(), f"trained from scratch, recipe {recipe} ({reason})"


def _recipe_of(version_dir: Path) -> str:
    """The training recipe a version's card names, if this code still has it, else v1."""
    try:
        card = json.loads((version_dir / "model_card.json").read_text())
    except (OSError, ValueError):
        return "v1"
    recipe = str(card.get("training", {}).get("recipe", "v1"))
    return recipe if recipe in RECIPES else "v1"


def train(
    model: keras.Model,
    raw_images: np.ndarray,
    labels: np.ndarray,
    feedback: FeedbackSplit,
    plan: TrainingPlan,
    fine_tune: bool,
) -> list[float]:
    """Train on the base images (augmented afresh each epoch) plus the weighted feedback.

    Base samples weigh 1 each; feedback examples carry their `train_weights`. Returns the
    loss of each epoch.
    """
    keras.utils.set_random_seed(plan.seed)
    rate = plan.fine_tune_learning_rate if fine_tune else plan.scratch_learning_rate
    if fine_tune:
        # Keep stable's batch-norm statistics: a short run on a small, feedback-heavy mix
        # would otherwise shift them towards that mix and cost accuracy everywhere else.
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    canvases = np.stack([mnist_canvas(image) for image in raw_images]) if plan.augment else None
    clean = None if plan.augment else _normalized(raw_images)
    rng = np.random.default_rng(plan.seed)
    losses = []
    for epoch in range(plan.epochs):
        base = augment_mnist(canvases, plan.seed * 1000 + epoch) if canvases is not None else clean
        assert base is not None
        x = np.concatenate([base, feedback.train_images]).astype(np.float32)
        y = np.concatenate([labels, feedback.train_labels])
        w = np.concatenate([np.ones(len(labels)), feedback.train_weights]).astype(np.float32)
        order = rng.permutation(len(y))
        batches = tf.data.Dataset.from_tensor_slices((x[order, ..., None], y[order], w[order]))
        history = model.fit(batches.batch(plan.batch_size), epochs=1, verbose=0)
        losses.append(float(history.history["loss"][0]))
        print(f"epoch {epoch + 1}/{plan.epochs}  loss {losses[-1]:.4f}", flush=True)
    return losses


def _normalized(raw_images: np.ndarray) -> np.ndarray:
    from training.data import normalize_batch  # noqa: PLC0415 - only without augmentation

    return normalize_batch(raw_images)


def quantize(
    model: keras.Model, raw_train: np.ndarray, labels: np.ndarray, plan: TrainingPlan
) -> bytes:
    """The int8 `.tflite` bytes, calibrated on training images as `quantize_model.py` does."""
    calibration = calibration_images(raw_train, labels, plan.calibration_samples, plan.seed)
    return bytes(convert(model, calibration))


def float_accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the float Keras model on normalised images."""
    if not len(labels):
        return float("nan")
    logits = np.concatenate(
        [model(images[i : i + 500, ..., None], training=False) for i in range(0, len(images), 500)]
    )
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def probabilities(model: DigitModel, images: np.ndarray) -> np.ndarray:
    """The int8 model's probabilities (n, 10) for normalised images, through the service's
    own `DigitModel`."""
    if not len(images):
        return np.zeros((0, 10), dtype=np.float32)
    chunks = [model.predict(images[i : i + 32]) for i in range(0, len(images), 32)]
    return np.concatenate(chunks)


def without_optimizer(model: keras.Model) -> keras.Model:
    """A copy without the optimizer state (a third of the file, and nobody resumes from it)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        layer.trainable = True  # the next fine-tune decides what to freeze
    return copy
