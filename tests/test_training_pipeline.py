"""Smoke test of the model pipeline: a tiny training run, int8 quantization and the card.

Runs the two scripts as a person (or `make model`) would, on 300 training samples for one
epoch, so it checks the plumbing, not the accuracy (the accuracy gate is switched off).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_api.model import DigitModel

ROOT = Path(__file__).resolve().parent.parent
CARD_FIELDS = {
    "name",
    "version",
    "sha256",
    "size_bytes",
    "input_shape",
    "input_dtype",
    "output",
    "quantization",
    "labels",
    "metrics",
    "latency_ms_per_image",
    "data",
    "preprocessing",
    "training",
    "created",
}


def run_script(*args: str) -> None:
    """Run a repository script with this interpreter; show its output if it fails."""
    result = subprocess.run(
        [sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a one-epoch model on 300 samples and quantize it, in a temporary directory."""
    out = tmp_path_factory.mktemp("pipeline")
    run_script("train_model.py", "--subset", "300", "--epochs", "1", "--out-dir", str(out))
    run_script(
        "quantize_model.py",
        "--keras", str(out / "mnist_cnn.keras"),
        "--out-dir", str(out),
        "--subset", "100",
        "--calibration-samples", "50",
        "--latency-repeats", "8",
        "--no-accuracy-gate",
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_outputs_exist(pipeline_dir: Path) -> None:
    for name in ("mnist_cnn.keras", "mnist_cnn_int8.tflite", "model_card.json"):
        assert (pipeline_dir / name).stat().st_size > 0, name
    assert not list(pipeline_dir.glob("*.pending"))


@pytest.mark.slow
def test_card_describes_the_file(pipeline_dir: Path) -> None:
    card = json.loads((pipeline_dir / "model_card.json").read_text())
    assert card.keys() >= CARD_FIELDS
    tflite = (pipeline_dir / "mnist_cnn_int8.tflite").read_bytes()
    sha256 = hashlib.sha256(tflite).hexdigest()
    assert card["sha256"] == sha256
    assert card["version"] == sha256[:12]
    assert card["size_bytes"] == len(tflite)
    assert card["name"] == "mnist-cnn-int8"
    assert card["output"] == "logits"
    assert card["input_dtype"] == "int8"
    assert card["labels"] == list(range(10))
    assert set(card["quantization"]) == {"input", "output"}
    assert {"scale", "zero_point"} <= card["quantization"]["input"].keys()
    assert card["metrics"]["test_samples"] == 100
    assert 0.0 <= card["metrics"]["accuracy_int8"] <= 1.0
    assert card["data"]["train"] == 4000 and card["data"]["test"] == 1000
    assert card["training"]["epochs"] == 1 and card["training"]["params"] > 0


@pytest.mark.slow
def test_digit_model_runs_the_tflite(pipeline_dir: Path) -> None:
    model = DigitModel(model_path=pipeline_dir / "mnist_cnn_int8.tflite")
    model.load()
    assert model.input_spec is not None and model.input_spec.dtype == np.int8
    assert model.output_spec is not None and model.output_spec.dtype == np.int8
    images = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
    probabilities = model.predict(images)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
