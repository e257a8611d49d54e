"""Quantize the Keras CNN to a full-integer int8 LiteRT model and write its model card.

Calibration uses training images only; accuracy is measured on the 1,000 test images, for
the float model in Keras and for the int8 model through `mnist_api.model.DigitModel`, the
code the service runs. The command fails when int8 loses more than 0.5 points to float.

    python quantize_model.py                   # models/mnist_cnn.keras -> models/*.tflite, card
    python quantize_model.py --keras /tmp/smoke/mnist_cnn.keras --out-dir /tmp/smoke \\
        --subset 100 --no-accuracy-gate
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras
import tensorflow as tf

from mnist_api.model import MODEL_NAME, DigitModel, file_sha256
from training.augment import augment_mnist, mnist_canvas
from training.data import (
    DATA_SOURCE,
    SPLIT_EXPRESSION,
    load_split,
    normalize_batch,
    stratified_subset,
)

TFLITE_FILE = "mnist_cnn_int8.tflite"
CARD_FILE = "model_card.json"
MAX_INT8_DROP = 0.005  # int8 may lose at most half a point of test accuracy to float
PREPROCESSING = (
    "decode, EXIF-rotate, alpha onto white, greyscale, light-on-dark, crop to the ink, "
    "longer side to 20 px, centre of mass at the centre of 28x28, [0, 1] "
    "(mnist_api.preprocessing.normalize_digit)"
)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keras", type=Path, default=Path("models/mnist_cnn.keras"))
    parser.add_argument("--out-dir", type=Path, default=Path("models"))
    parser.add_argument(
        "--subset", type=int, default=None, help="evaluate on N test samples only (smoke runs)"
    )
    parser.add_argument(
        "--calibration-samples", type=int, default=400, help="training images for calibration"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-repeats", type=int, default=200)
    parser.add_argument(
        "--no-accuracy-gate",
        action="store_true",
        help="do not fail when int8 loses more than 0.5 points (for 1-epoch smoke models)",
    )
    return parser.parse_args()


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


def keras_accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the float Keras model."""
    logits = np.concatenate(
        [model(images[i : i + 500, ..., None], training=False) for i in range(0, len(images), 500)]
    )
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def int8_accuracy(model: DigitModel, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the int8 model through the service's `DigitModel`, in batches of 32."""
    predictions = [model.predict(images[i : i + 32]) for i in range(0, len(images), 32)]
    return float(np.mean(np.argmax(np.concatenate(predictions), axis=1) == labels))


def latency_ms(model: DigitModel, images: np.ndarray, batch: int, repeats: int) -> float:
    """Median wall time per image of `DigitModel.predict` on batches of `batch` images."""
    inputs = images[:batch]
    model.predict(inputs)  # first call on a batch size builds its interpreter
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0 / batch


def training_record(card_path: Path, keras_path: Path, model: keras.Model) -> dict[str, Any]:
    """The `training` section `train_model.py` left in the card next to the Keras file.

    Used only if it names this exact Keras file (by SHA-256); otherwise only the parameter
    count is known.
    """
    record: dict[str, Any] = {}
    if card_path.exists():
        record = json.loads(card_path.read_text()).get("training", {})
    if record.get("keras_sha256") != file_sha256(keras_path):
        print(f"warning: no training record for {keras_path} in {card_path}", file=sys.stderr)
        record = {}
    return {**record, "params": int(model.count_params())}


def quantization_of(spec: Any) -> dict[str, float | int]:
    """Scale and zero point of a `TensorSpec`, for the card."""
    return {"scale": spec.scale, "zero_point": spec.zero_point}


def main() -> int:
    """Convert, evaluate, gate and write the .tflite and its card. Returns the exit status."""
    args = parse_args()
    split = load_split()
    x_test, y_test = split.x_test, split.y_test
    if args.subset is not None:
        x_test, y_test, _, _ = stratified_subset(x_test, y_test, args.subset, args.seed)
    test_images = normalize_batch(x_test)

    model = keras.models.load_model(args.keras)
    # Read before the card is rewritten: train_model.py left it next to the Keras file.
    training = training_record(args.keras.parent / CARD_FILE, args.keras, model)
    calibration = calibration_images(
        split.x_train, split.y_train, args.calibration_samples, args.seed
    )
    print(f"calibrating on {len(calibration)} training images", flush=True)
    tflite = convert(model, calibration)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tflite_path = args.out_dir / TFLITE_FILE
    # Written under a temporary name first: a model that fails the gate never replaces the
    # one in place.
    pending = tflite_path.with_suffix(".tflite.pending")
    pending.write_bytes(tflite)
    digit_model = DigitModel(model_path=pending)
    digit_model.load()

    accuracy_float = keras_accuracy(model, test_images, y_test)
    accuracy_int8 = int8_accuracy(digit_model, test_images, y_test)
    print(
        f"test accuracy: float {accuracy_float:.4f}, int8 {accuracy_int8:.4f} "
        f"({len(y_test)} samples)",
        flush=True,
    )
    if accuracy_int8 < accuracy_float - MAX_INT8_DROP and not args.no_accuracy_gate:
        pending.unlink()
        print(
            f"error: int8 accuracy {accuracy_int8:.4f} is more than {MAX_INT8_DROP * 100:.1f} "
            f"points below float {accuracy_float:.4f}; {tflite_path} was not written",
            file=sys.stderr,
        )
        return 1

    latency = {
        "batch_1": round(latency_ms(digit_model, test_images, 1, args.latency_repeats), 4),
        "batch_32": round(latency_ms(digit_model, test_images, 32, args.latency_repeats // 4), 4),
        "runtime": f"ai-edge-litert {package_version('ai-edge-litert')}, 1 thread",
        "statistic": "median over repeats, DigitModel.predict, ms per image",
    }
    os.replace(pending, tflite_path)
    assert digit_model.input_spec is not None and digit_model.output_spec is not None
    sha256 = hashlib.sha256(tflite).hexdigest()
    card_path = args.out_dir / CARD_FILE
    card = {
        "name": MODEL_NAME,
        "version": sha256[:12],
        "sha256": sha256,
        "size_bytes": len(tflite),
        "input_shape": list(digit_model.input_spec.shape),
        "input_dtype": digit_model.input_spec.dtype.name,
        "output": "logits",
        "output_shape": list(digit_model.output_spec.shape),
        "output_dtype": digit_model.output_spec.dtype.name,
        "quantization": {
            "input": quantization_of(digit_model.input_spec),
            "output": quantization_of(digit_model.output_spec),
        },
        "labels": list(range(10)),
        "metrics": {
            "accuracy_float": round(accuracy_float, 4),
            "accuracy_int8": round(accuracy_int8, 4),
            "test_samples": len(y_test),
        },
        "latency_ms_per_image": latency,
        "data": {
            "source": DATA_SOURCE,
            "samples": split.total,
            "split": SPLIT_EXPRESSION,
            "train": len(split.y_train),
            "test": len(split.y_test),
            "calibration": f"{len(calibration)} training images (half augmented)",
        },
        "preprocessing": PREPROCESSING,
        "training": training,
        "created": datetime.date.today().isoformat(),
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {tflite_path} ({len(tflite)} bytes, version {sha256[:12]}) and {card_path}")
    print(
        f"latency per image: {latency['batch_1']:.3f} ms single, "
        f"{latency['batch_32']:.3f} ms in batches of 32"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
