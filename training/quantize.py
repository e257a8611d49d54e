"""Full-integer (int8) post-training quantization and its calibration set, shared by
`quantize_model.py` and `training/challenger.py` (the scripts stay thin entry points).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras
import tensorflow as tf

from training.augment import augment_mnist, mnist_canvas
from training.data import normalize_batch, stratified_subset


def calibration_images(
    x_train: np.ndarray, y_train: np.ndarray, count: int, seed: int
) -> np.ndarray:
    """Stratified training images, half clean and half augmented, as the service sees them.

    The augmented half covers the heavier, slanted and distorted digits the model will get,
    so their activations fall inside the calibrated int8 ranges rather than being clipped.
    """
    count = min(count, len(y_train) - len(np.unique(y_train)))
    images, _, _, _ = stratified_subset(x_train, y_train, count, seed)
    half = count // 2
    clean = normalize_batch(images[:half])
    canvases = np.stack([mnist_canvas(image) for image in images[half:]])
    return np.concatenate([clean, augment_mnist(canvases, seed)])


def convert(model: keras.Model, calibration: np.ndarray) -> bytes:
    """Full-integer post-training quantization: int8 weights, activations, input and output."""

    def representative_dataset() -> Iterator[list[np.ndarray]]:
        for image in calibration:
            yield [image[None, :, :, None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    # The Keras export step prints every traced tensor signature; keep the log readable.
    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()
