"""Quantize a Keras CNN to full-integer int8 LiteRT and install it as a new model version.

Calibration uses training images only. The accuracy gate compares int8 (through
`mnist_api.inference.model.DigitModel`, the code the service runs) with float on the validation
split,
the 500 training images `train_model.py` holds out (same seed and size): the test split is
never used to decide anything, it is only reported on the card, with the printed-digit,
user-style and other-writers suites of `training.evaluate`.

Everything is written to a staging folder beside `--models-dir` first; only when the gate and
the evaluation passed is the folder renamed, in one atomic step, to `models/<version>/`
(`<version>`: first 12 hex digits of the .tflite's SHA-256), holding `mnist_cnn_int8.tflite`,
its browser variant `mnist_cnn_browser.tflite` (float32 in and out around the same int8 graph,
for the page's on-device prediction), `model_card.json` and the float source `mnist_cnn.keras`.
A failed gate leaves `models/` exactly as it was.

    python quantize_model.py                   # build/model/mnist_cnn.keras -> models/<version>/
    python quantize_model.py --keras /tmp/smoke/mnist_cnn.keras --models-dir /tmp/smoke/models \\
        --subset 100 --no-accuracy-gate
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras

from mnist_api.inference.model import MODEL_NAME, DigitModel, file_sha256
from training.browser_variant import check_variant, write_browser_variant
from training.data import (
    DATA_SOURCE,
    SPLIT_EXPRESSION,
    VALIDATION_SIZE,
    Split,
    load_split,
    normalize_batch,
    stratified_subset,
    validation_mask,
)
from training.evaluate import (
    latency_ms,
    other_writers_suite,
    printed_suite,
    suite_metrics,
    user_style_suite,
)
from training.quantize import calibration_images, convert

TFLITE_FILE = "mnist_cnn_int8.tflite"
CARD_FILE = "model_card.json"
KERAS_FILE = "mnist_cnn.keras"
MAX_INT8_DROP = 0.005  # int8 may lose at most half a point of validation accuracy to float
PREPROCESSING = (
    "decode, EXIF-rotate, alpha onto white, greyscale, light-on-dark, crop to the ink, "
    "longer side to 20 px, centre of mass at the centre of 28x28, [0, 1] "
    "(mnist_api.imaging.preprocessing.normalize_digit)"
)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keras", type=Path, default=Path("build/model/mnist_cnn.keras"), help="float model"
    )
    parser.add_argument(
        "--models-dir", type=Path, default=Path("models"), help="installs into DIR/<version>/"
    )
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="gate and evaluate on N samples per split only (smoke runs)",
    )
    parser.add_argument(
        "--calibration-samples", type=int, default=400, help="training images for calibration"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="train_model.py's seed: picks the validation rows"
    )
    parser.add_argument("--latency-repeats", type=int, default=200)
    parser.add_argument(
        "--max-int8-drop",
        type=float,
        default=MAX_INT8_DROP,
        help="largest validation accuracy int8 may lose to float (0.005: half a point)",
    )
    parser.add_argument(
        "--no-accuracy-gate",
        action="store_true",
        help="install even when int8 loses more than --max-int8-drop (1-epoch smoke models)",
    )
    return parser.parse_args()


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


def validation_images(split: Split, seed: int, subset: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The validation rows `train_model.py` carves from the training split (same seed, size)."""
    mask = validation_mask(split.y_train, VALIDATION_SIZE, seed)
    x_val, y_val = split.x_train[mask], split.y_train[mask]
    if subset is not None and subset < len(y_val):
        x_val, y_val, _, _ = stratified_subset(x_val, y_val, subset, seed)
    return normalize_batch(x_val), y_val


def test_images(split: Split, seed: int, subset: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The test split (or a stratified part of it), normalised: reported, never decided on."""
    x_test, y_test = split.x_test, split.y_test
    if subset is not None:
        x_test, y_test, _, _ = stratified_subset(x_test, y_test, subset, seed)
    return normalize_batch(x_test), y_test


def install(staging: Path, models_dir: Path, version: str) -> Path | None:
    """Move a complete staging folder to `models_dir/<version>` in one atomic rename.

    Returns the new folder, or None when that version is already installed (the same
    .tflite bytes): the installed one is left alone.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / version
    if target.exists():
        return None
    # mkdtemp made the folder private (0700); an installed version is readable by all, like
    # any folder created under the usual umask.
    staging.chmod(0o755)
    for path in staging.iterdir():
        _fsync(path)  # the files are on disk before the rename makes them visible
    try:
        # rename(2) of a directory is atomic on one filesystem: readers of models/ see the
        # whole version folder or none of it, never a half-written one.
        os.rename(staging, target)
    except OSError:
        if target.exists():  # another run installed the same version meanwhile
            return None
        raise
    _fsync(models_dir)
    return target


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def main() -> int:
    """Convert, gate on validation, evaluate, write the card, install. Returns the exit status."""
    args = parse_args()
    split = load_split()
    val_images, y_val = validation_images(split, args.seed, args.subset)
    x_test, y_test = test_images(split, args.seed, args.subset)

    model = keras.models.load_model(args.keras)
    # Read before anything else: train_model.py left it next to the Keras file.
    training = training_record(args.keras.parent / CARD_FILE, args.keras, model)
    calibration = calibration_images(
        split.x_train, split.y_train, args.calibration_samples, args.seed
    )
    print(f"calibrating on {len(calibration)} training images", flush=True)
    tflite = convert(model, calibration)
    sha256 = hashlib.sha256(tflite).hexdigest()
    version = sha256[:12]

    # Staged beside models/, on the same filesystem (so the final rename is atomic), and
    # outside it, so that nothing in models/ changes unless the install succeeds.
    models_dir = args.models_dir
    models_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(
            prefix=f".{models_dir.absolute().name}-staging-{os.getpid()}-",
            dir=models_dir.absolute().parent,
        )
    )
    try:
        tflite_path = staging / TFLITE_FILE
        tflite_path.write_bytes(tflite)
        digit_model = DigitModel(model_path=tflite_path)
        digit_model.load()

        val_float = keras_accuracy(model, val_images, y_val)
        val_int8 = int8_accuracy(digit_model, val_images, y_val)
        print(
            f"validation accuracy: float {val_float:.4f}, int8 {val_int8:.4f} "
            f"({len(y_val)} samples)",
            flush=True,
        )
        if val_int8 < val_float - args.max_int8_drop and not args.no_accuracy_gate:
            print(
                f"error: int8 validation accuracy {val_int8:.4f} is more than "
                f"{args.max_int8_drop * 100:.1f} points below float {val_float:.4f}; "
                f"nothing was installed in {models_dir}",
                file=sys.stderr,
            )
            return 1

        test_float = keras_accuracy(model, x_test, y_test)
        test_int8 = int8_accuracy(digit_model, x_test, y_test)
        print(
            f"test accuracy (reported only): float {test_float:.4f}, int8 {test_int8:.4f} "
            f"({len(y_test)} samples)",
            flush=True,
        )
        suites = [user_style_suite(args.subset), printed_suite(args.subset)]
        suites.append(other_writers_suite(args.subset))
        extra = suite_metrics(digit_model, suites)
        print(
            "int8 on other inputs: "
            + ", ".join(f"{suite.name} {extra[f'{suite.name}_accuracy']:.4f}" for suite in suites),
            flush=True,
        )
        latency = {
            "batch_1": round(latency_ms(digit_model, x_test, 1, args.latency_repeats), 4),
            "batch_32": round(latency_ms(digit_model, x_test, 32, args.latency_repeats // 4), 4),
            "runtime": f"ai-edge-litert {package_version('ai-edge-litert')}, 1 thread",
            "statistic": "median over repeats, DigitModel.predict, ms per image",
        }
        browser = write_browser_variant(staging)
        check_variant(staging, val_images[:200])
        assert digit_model.input_spec is not None and digit_model.output_spec is not None
        card = {
            "name": MODEL_NAME,
            "version": version,
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
                "accuracy_float": round(test_float, 4),
                "accuracy_int8": round(test_int8, 4),
                "test_samples": len(y_test),
                "validation_accuracy_float": round(val_float, 4),
                "validation_accuracy_int8": round(val_int8, 4),
                "validation_samples": len(y_val),
                **extra,
            },
            "gate": {
                "split": "validation",
                "max_int8_drop": args.max_int8_drop,
                "enforced": not args.no_accuracy_gate,
            },
            "latency_ms_per_image": latency,
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
                "calibration": f"{len(calibration)} training images (half augmented)",
                "evaluation": "training.evaluate suites: user_style, printed, other_writers",
            },
            "preprocessing": PREPROCESSING,
            # The page's copy (float32 edges around this same int8 graph): see
            # training/browser_variant.py; checked against the int8 file on validation.
            "browser": browser,
            "training": training,
            "created": datetime.date.today().isoformat(),
        }
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        shutil.copyfile(args.keras, staging / KERAS_FILE)
        installed = install(staging, models_dir, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful install
    if installed is None:
        print(f"version {version} is already installed in {models_dir / version}; kept it")
        return 0
    print(f"installed version {version} in {installed} ({len(tflite)} bytes)")
    print(
        f"latency per image: {latency['batch_1']:.3f} ms single, "
        f"{latency['batch_32']:.3f} ms in batches of 32"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
