"""Quantize a Keras CNN to full-integer int8 LiteRT and install it as a new model version.

Calibration uses training images only. The int8 gate compares int8 (through
`mnist_api.inference.model.DigitModel`, the code the service runs) with float on the validation
split, the 500 training images `train_model.py` holds out (same seed and size). The release
gate (`training/release_gate.py`) then compares the new version with the stable one on the
test split, user-style uploads and printed digits; the other-writers (UCI) figures are
measured and written on the card, never decided on. A version that passes is marked to be
proposed as candidate.

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

from mnist_api.config import Settings
from mnist_api.deployment.proposals import (
    Proposal,
    StableUnknown,
    propose_candidate,
    stable_version,
)
from mnist_api.inference.model import DigitModel
from mnist_api.inference.registry import ModelRegistry, is_version_dir
from training import fitting, model_report, release_gate
from training.browser_variant import check_variant, write_browser_variant
from training.card import model_card, training_record
from training.data import (
    VALIDATION_SIZE,
    Split,
    load_split,
    normalize_batch,
    stratified_subset,
    validation_mask,
)
from training.evaluate import (
    Suite,
    accuracy,
    latency_ms,
    load_version,
    other_suites,
    probabilities,
    set_metrics,
)
from training.install import install
from training.quantize import calibration_images, convert

TFLITE_FILE = "mnist_cnn_int8.tflite"
CARD_FILE = "model_card.json"
KERAS_FILE = "mnist_cnn.keras"
MAX_INT8_DROP = 0.005  # int8 may lose at most half a point of validation accuracy to float


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
        "--stable",
        default=None,
        help="the version to beat (default: the deployment in force's stable version)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=release_gate.TOLERANCE,
        help="release gate: how much worse than stable each other set may be (0.005: 0.5 pt)",
    )
    parser.add_argument(
        "--no-release-gate",
        action="store_true",
        help="install even when the model does not beat stable (it is then not proposed)",
    )
    parser.add_argument(
        "--propose",
        action="store_true",
        help="put the new version out as candidate now (else the release phase does it)",
    )
    parser.add_argument(
        "--no-accuracy-gate",
        action="store_true",
        help="install even when int8 loses more than --max-int8-drop (1-epoch smoke models)",
    )
    return parser.parse_args()


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

        val_float = fitting.accuracy(model, val_images, y_val)
        val_int8 = accuracy(digit_model, Suite("validation", "validation", val_images, y_val))
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

        test_float = fitting.accuracy(model, x_test, y_test)
        suites = [Suite("test", "test split", x_test, y_test), *other_suites(args.subset)]
        found = {suite.name: probabilities(digit_model, suite.images) for suite in suites}
        measured = measure(found, suites)
        test_int8 = measured["test_accuracy"]
        print(
            f"test accuracy: float {test_float:.4f}, int8 {test_int8:.4f} ({len(y_test)} samples)",
            flush=True,
        )
        print(
            "int8 on other inputs: "
            + ", ".join(f"{s.name} {measured[f'{s.name}_accuracy']:.4f}" for s in suites[1:]),
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
        metrics = {
            "accuracy_float": round(test_float, 4),
            "accuracy_int8": round(test_int8, 4),
            "test_ece": measured["test_ece"],
            "test_samples": len(y_test),
            "validation_accuracy_float": round(val_float, 4),
            "validation_accuracy_int8": round(val_int8, 4),
            "validation_samples": len(y_val),
            **{k: v for k, v in measured.items() if not k.startswith("test_")},
        }
        card = model_card(args, digit_model, tflite, split, len(calibration), metrics)
        card.update(latency_ms_per_image=latency, browser=browser, training=training)

        series: model_report.Series = {s.name: [(version, found[s.name], s.labels)] for s in suites}
        stable = stable_to_beat(args, version)
        stable_metrics = None
        if stable is not None:
            stable_found = {suite.name: probabilities(stable, suite.images) for suite in suites}
            stable_metrics = measure(stable_found, suites)
            stable_metrics["accuracy_int8"] = stable_metrics["test_accuracy"]
            for suite in suites:
                series[suite.name].append(
                    (f"{stable.version} (stable)", stable_found[suite.name], suite.labels)
                )
            checks = release_gate.checks(metrics, stable_metrics, args.tolerance)
            card["release_gate"] = release_gate.card_entry(
                stable.version, checks, enforced=not args.no_release_gate
            )
            for check in checks:
                verdict = "pass" if check.passed else "FAIL"
                print(f"release gate, {check.name}: {check.rule} ({check.detail}): {verdict}")
            if not card["release_gate"]["passed"] and not args.no_release_gate:
                print(
                    f"error: the new version does not pass the release gate against stable "
                    f"{stable.version}; nothing was installed in {models_dir}",
                    file=sys.stderr,
                )
                return 1
            if card["release_gate"]["passed"]:
                card["proposed"] = Proposal(version).card_entry()
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        report = (stable.version, stable_metrics) if stable and stable_metrics else None
        model_report.write(staging, card, report, series)
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
    print(f"training report: {installed / model_report.REPORT_MD}")
    if "proposed" in card:
        if args.propose:
            outcome = propose_candidate(Proposal(version), Settings.from_env(), by="make model")
            print(f"proposal: {outcome.message}")
        else:
            print("proposed as candidate (a 10% canary): the release phase puts it out")
    return 0


def measure(found: dict[str, np.ndarray], suites: list[Suite]) -> dict[str, Any]:
    """`<set>_accuracy`, `<set>_ece`, `<set>_samples` of every suite from its probabilities."""
    measured: dict[str, Any] = {}
    for suite in suites:
        measured.update(set_metrics(suite.name, found[suite.name], suite.labels))
    return measured


def stable_to_beat(args: argparse.Namespace, version: str) -> DigitModel | None:
    """The stable version the release gate compares with, loaded; None when there is none.

    `--stable`, else the stable version of the deployment in force (DATABASE_URL, else the
    embedded SQLite file); None when nothing is installed yet (the first version), or when
    the new version is itself that stable one (a rebuild of the same bytes).
    """
    if not any(is_version_dir(path) for path in _children(args.models_dir)):
        return None
    registry = ModelRegistry.discover(args.models_dir)
    wanted = args.stable
    if wanted is None:
        try:
            wanted = stable_version(Settings.from_env(), registry)
        except StableUnknown as error:
            raise SystemExit(f"error: {error}") from error
    if wanted == version:
        return None
    return load_version(args.models_dir / wanted)


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


if __name__ == "__main__":
    sys.exit(main())
