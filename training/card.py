"""The model card `quantize_model.py` writes for a new version: what the service and the
release check read (file, tensors, quantisation) and how the version was made and measured."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import keras

from mnist_api.inference.model import MODEL_NAME, DigitModel, file_sha256
from training.data import DATA_SOURCE, SPLIT_EXPRESSION, VALIDATION_SIZE, Split

CARD_FILE = "model_card.json"

PREPROCESSING = (
    "decode, EXIF-rotate, alpha onto white, greyscale, light-on-dark, crop to the ink, "
    "longer side to 20 px, centre of mass at the centre of 28x28, [0, 1] "
    "(mnist_api.imaging.preprocessing.normalize_digit)"
)


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


def file_fields(model: DigitModel, tflite: bytes) -> dict[str, Any]:
    """What a card says of its `.tflite` (name, version, hash, tensors, quantisation, labels):
    what the service and the release check read. Shared by `quantize_model.py` and the
    retraining's card."""
    sha256 = hashlib.sha256(tflite).hexdigest()
    assert model.input_spec is not None and model.output_spec is not None
    return {
        "name": MODEL_NAME,
        "version": sha256[:12],
        "sha256": sha256,
        "size_bytes": len(tflite),
        "input_shape": list(model.input_spec.shape),
        "input_dtype": model.input_spec.dtype.name,
        "output": "logits",
        "output_shape": list(model.output_spec.shape),
        "output_dtype": model.output_spec.dtype.name,
        "quantization": {
            "input": quantization_of(model.input_spec),
            "output": quantization_of(model.output_spec),
        },
        "labels": list(range(10)),
    }


def model_card(
    args: argparse.Namespace,
    digit_model: DigitModel,
    tflite: bytes,
    split: Split,
    calibration_count: int,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The new version's card, apart from latency, browser variant, training and release."""
    return {
        **file_fields(digit_model, tflite),
        "metrics": metrics,
        "gate": {
            "split": "validation",
            "max_int8_drop": args.max_int8_drop,
            "enforced": not args.no_accuracy_gate,
        },
        "data": {
            "source": DATA_SOURCE,
            "samples": split.total,
            "split": SPLIT_EXPRESSION,
            "train": len(split.y_train),
            "test": len(split.y_test),
            "validation": (
                f"{VALIDATION_SIZE} training images, "
                f"training.data.validation_mask(seed={args.seed}) as train_model.py "
                "holds them out (a full-fit model has also trained on them)"
            ),
            "calibration": f"{calibration_count} training images (half augmented)",
            "evaluation": (
                "training.evaluate suites: user_style, printed, other_writers (UCI digits: "
                "evaluation only, never trained on, never decide)"
            ),
        },
        "preprocessing": PREPROCESSING,
        "created": datetime.date.today().isoformat(),
    }
