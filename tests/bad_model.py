"""A real but deliberately bad model version, for the deployment tests.

    python -m tests.bad_model MODELS_DIR     # prints the new version id

Trains a tiny Keras network on shuffled labels (a few seconds), converts it to a full-int8
`.tflite` exactly as `quantize_model.py` does, and installs it as `MODELS_DIR/<version>/`
with a model card. It loads and answers like any version, but its answers are near-uniform
guesses: mostly low-confidence and mostly wrong. Run in a subprocess so TensorFlow never
shares a process with LiteRT in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from quantize_model import CARD_FILE, TFLITE_FILE, convert
from training.data import load_split, normalize_batch

# Older than any real version, so it is never "the newest installed" (the default stable).
CREATED = "2000-01-01T00:00:00+00:00"


def train_on_shuffled_labels(seed: int = 0) -> keras.Model:
    """A small dense network fitted to labels that have nothing to do with the images."""
    keras.utils.set_random_seed(seed)
    split = load_split()
    images = normalize_batch(split.x_train[:1000])
    labels = np.random.default_rng(seed).permutation(split.y_train[:1000])
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images[..., None], labels, epochs=2, batch_size=64, verbose=0)
    return model


def install(models_dir: Path, seed: int = 0) -> str:
    """Train, convert to int8, write `<version>/` with its card; the version id."""
    model = train_on_shuffled_labels(seed)
    calibration = normalize_batch(load_split().x_train[:100])
    tflite = convert(model, calibration)
    sha256 = hashlib.sha256(tflite).hexdigest()
    version = sha256[:12]
    folder = models_dir / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TFLITE_FILE).write_bytes(tflite)
    card = {
        "name": "mnist-cnn-int8",
        "version": version,
        "sha256": sha256,
        "size_bytes": len(tflite),
        "created": CREATED,
        "metrics": {"note": "trained on shuffled labels for the deployment tests"},
    }
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2))
    return version


if __name__ == "__main__":
    print(install(Path(sys.argv[1])))
