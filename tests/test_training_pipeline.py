"""Smoke test of the model pipeline: a tiny training run, int8 quantization, staged install.

Runs the scripts as a person (or `make model`) would, on 300 training samples for one
epoch, so it checks the plumbing, not the accuracy: the install into a temporary models
folder (`models/<version>/` with the .tflite, its card and the Keras source), a gate that
fails on purpose and must leave that folder exactly as it was, and the version comparison.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_api.deployment.proposals import Proposal, pending_proposal
from mnist_api.inference.model import DigitModel
from mnist_api.inference.registry import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent
STABLE = "fe5e4f4d480b"  # the first version: what a one-epoch model is gated against
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
    "gate",
    "latency_ms_per_image",
    "data",
    "preprocessing",
    "training",
    "created",
}
VERSION_FILES = {
    "mnist_cnn_int8.tflite",
    "mnist_cnn_browser.tflite",  # the page's copy: float32 edges around the same int8 graph
    "model_card.json",
    "mnist_cnn.keras",
    "training_report.md",  # issue 25: figures per set, the release gate, reliability diagrams
    "training_report.png",
}
QUANTIZE_SMOKE = ("--subset", "100", "--calibration-samples", "50", "--latency-repeats", "8")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a repository script with this interpreter and return how it went."""
    return subprocess.run(
        [sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def run_ok(*args: str) -> str:
    """Run a script that must succeed; return its standard output."""
    result = run_script(*args)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under a folder: its mode, mtime and (for files) the SHA-256 of its bytes."""
    entries = {}
    for path in sorted([folder, *folder.rglob("*")]):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        entries[str(path.relative_to(folder))] = (stat.st_mode, stat.st_mtime_ns, digest)
    return entries


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a one-epoch model on 300 samples, quantize it and install it in `models/`."""
    root = tmp_path_factory.mktemp("pipeline")
    build = root / "build"
    run_ok("train_model.py", "--subset", "300", "--epochs", "1", "--out-dir", str(build))
    run_ok(
        "quantize_model.py",
        "--keras", str(build / "mnist_cnn.keras"),
        "--models-dir", str(root / "models"),
        *QUANTIZE_SMOKE,
        "--no-accuracy-gate",
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def installed(workspace: Path) -> Path:
    """The one version folder the smoke run installed."""
    folders = list((workspace / "models").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_install_makes_one_complete_version_folder(workspace: Path, installed: Path) -> None:
    assert {path.name for path in installed.iterdir()} == VERSION_FILES
    for path in installed.iterdir():
        assert path.stat().st_size > 0, path
    tflite = (installed / "mnist_cnn_int8.tflite").read_bytes()
    assert installed.name == hashlib.sha256(tflite).hexdigest()[:12]
    # The float source is copied in unchanged.
    trained = (workspace / "build" / "mnist_cnn.keras").read_bytes()
    assert (installed / "mnist_cnn.keras").read_bytes() == trained
    assert installed.stat().st_mode & 0o755 == 0o755  # not mkdtemp's private 0700
    # No staging folder is left beside models/.
    assert sorted(path.name for path in workspace.iterdir()) == ["build", "models"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_card_describes_the_file(installed: Path) -> None:
    card = json.loads((installed / "model_card.json").read_text())
    assert card.keys() >= CARD_FIELDS
    tflite = (installed / "mnist_cnn_int8.tflite").read_bytes()
    sha256 = hashlib.sha256(tflite).hexdigest()
    assert card["sha256"] == sha256
    assert card["version"] == sha256[:12] == installed.name
    assert card["size_bytes"] == len(tflite)
    assert card["name"] == "mnist-cnn-int8"
    assert card["output"] == "logits"
    browser = (installed / card["browser"]["file"]).read_bytes()
    assert card["browser"]["sha256"] == hashlib.sha256(browser).hexdigest()
    assert card["browser"]["size_bytes"] == len(browser)
    assert card["input_dtype"] == "int8"
    assert card["labels"] == list(range(10))
    assert set(card["quantization"]) == {"input", "output"}
    assert {"scale", "zero_point"} <= card["quantization"]["input"].keys()
    metrics = card["metrics"]
    assert metrics["test_samples"] == 100 and metrics["validation_samples"] == 100
    for name in ("accuracy_int8", "validation_accuracy_int8", "user_style_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0, name
    for name in ("test", "user_style", "printed", "other_writers"):  # ECE, 15 bins, per set
        assert 0.0 <= metrics[f"{name}_ece"] <= 1.0, name
    assert metrics["printed_samples"] > 0 and metrics["other_writers_samples"] == 100
    assert card["gate"]["split"] == "validation" and card["gate"]["enforced"] is False
    assert card["latency_ms_per_image"]["batch_1"] > 0
    assert card["data"]["train"] == 4000 and card["data"]["test"] == 1000
    training = card["training"]
    assert training["recipe"] == "v3" and training["epochs"] == 1 and training["params"] > 0
    # The default recipe distils four teachers into the shipped network.
    teachers = training["distillation"]["teachers"]
    assert [t["recipe"] for t in teachers] == ["v2", "v1", "v2", "v1"]
    assert [t["seed"] for t in teachers] == [1, 2, 3, 4]
    # The first version installed has no stable to be gated against, so it is not proposed.
    assert "release_gate" not in card and "proposed" not in card
    report = (installed / "training_report.md").read_text()
    assert "No stable version to gate against" in report and "training_report.png" in report


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_a_version_that_does_not_beat_stable_is_refused(workspace: Path, tmp_path: Path) -> None:
    """Issue 25: the release gate against stable (the one-epoch model loses to it)."""
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / STABLE, models / STABLE)
    before = snapshot(models)
    result = run_script(
        "quantize_model.py",
        "--keras", str(workspace / "build" / "mnist_cnn.keras"),
        "--models-dir", str(models),
        *QUANTIZE_SMOKE,
        "--no-accuracy-gate",
        "--stable", STABLE,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "release gate, test split: better than stable" in result.stdout
    assert "does not pass the release gate" in result.stderr
    assert snapshot(models) == before
    # Installed anyway when asked, with the verdict in its card and report, and not proposed.
    run_ok(
        "quantize_model.py",
        "--keras", str(workspace / "build" / "mnist_cnn.keras"),
        "--models-dir", str(models),
        *QUANTIZE_SMOKE,
        "--no-accuracy-gate",
        "--stable", STABLE,
        "--no-release-gate",
    )  # fmt: skip
    (new,) = [path for path in models.iterdir() if path.name != STABLE]
    card = json.loads((new / "model_card.json").read_text())
    gate = card["release_gate"]
    assert gate["stable"] == STABLE and gate["passed"] is False and gate["enforced"] is False
    assert [check["name"] for check in gate["checks"]] == [
        "test split",
        "user-style uploads",
        "printed digits",
    ]
    assert "proposed" not in card
    report = (new / "training_report.md").read_text()
    assert f"{STABLE} (stable)" in report and "**failed**" in report


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_digit_model_runs_the_tflite(installed: Path) -> None:
    model = DigitModel(
        model_path=installed / "mnist_cnn_int8.tflite", card_path=installed / "model_card.json"
    )
    model.load()
    assert not model.card_mismatch()
    assert model.input_spec is not None and model.input_spec.dtype == np.int8
    assert model.output_spec is not None and model.output_spec.dtype == np.int8
    images = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
    probabilities = model.predict(images)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_failed_gate_leaves_models_untouched(workspace: Path, installed: Path) -> None:
    before = snapshot(workspace / "models")
    # int8 would have to beat float by 100 points: the gate fails whatever the weights are.
    result = run_script(
        "quantize_model.py",
        "--keras", str(workspace / "build" / "mnist_cnn.keras"),
        "--models-dir", str(workspace / "models"),
        *QUANTIZE_SMOKE,
        "--max-int8-drop", "-1",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing was installed" in result.stderr
    assert snapshot(workspace / "models") == before
    assert sorted(path.name for path in workspace.iterdir()) == ["build", "models"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_failed_gate_does_not_create_a_models_folder(workspace: Path, tmp_path: Path) -> None:
    result = run_script(
        "quantize_model.py",
        "--keras", str(workspace / "build" / "mnist_cnn.keras"),
        "--models-dir", str(tmp_path / "models"),
        *QUANTIZE_SMOKE,
        "--max-int8-drop", "-1",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_evaluate_compares_versions(installed: Path) -> None:
    output = run_ok("-m", "training.evaluate", str(installed), str(installed), "--subset", "60")
    table = output[output.index("int8 accuracy") :].split("\n", 1)[1]
    *rows, latency = [line for line in table.splitlines() if line.strip()]
    sets = ["test split", "user-style uploads", "printed digits", "other writers"]
    # Accuracy per set, then the expected calibration error (15 bins) per set.
    assert [row.split("(")[0].strip() for row in rows] == [*sets, "ECE, 15 bins", *sets]
    rows.remove(rows[len(sets)])
    for row in rows:  # two columns, the same model twice: the same figures
        first, second = (float(cell) for cell in row.split()[-2:])
        assert 0.0 <= first <= 1.0 and first == second
    assert latency.startswith("ms per image")
    assert all(float(cell) > 0 for cell in latency.split()[-2:])


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module fixture trains and quantizes on a busy CPU
def test_recipe_v1_still_builds_the_first_model() -> None:
    # Importing train_model starts TensorFlow: keep it out of this process.
    code = (
        "from train_model import RECIPES; m = RECIPES['v1'].build(); "
        "print(m.name, m.count_params())"
    )
    output = run_ok("-c", code).split()
    # 131,754 parameters: what models/fe5e4f4d480b's card records for the first model.
    assert output[-2:] == ["mnist_cnn", "131754"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    """Issue 25: `make model` reproduces its figures. Same seed, same data, same weights:
    the augmentation is seeded per chunk, the shuffles per network, TensorFlow's kernels are
    deterministic. Two short distillation runs give bit-identical networks."""
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        run_ok(
            "train_model.py", "--subset", "200", "--epochs", "1", "--no-full-fit",
            "--out-dir", str(out),
        )  # fmt: skip
    # Loading Keras starts TensorFlow: compare in a child process.
    code = (
        "import sys, numpy as np, keras\n"
        "a, b = (keras.models.load_model(p).get_weights() for p in sys.argv[1:])\n"
        "print('same' if all(np.array_equal(x, y) for x, y in zip(a, b)) else 'differ')\n"
    )
    output = run_ok("-c", code, *(str(out / "mnist_cnn.keras") for out in runs))
    assert output.split()[-1] == "same"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_version_that_beats_stable_is_installed_and_proposed(tmp_path: Path) -> None:
    """Issue 25's release path, on the shipped default stable's own float model: quantized
    again, it beats the first version on the full sets, is installed with the same figures
    its card reports, and is proposed as candidate (a 10% canary) for the release phase."""
    shipped = ModelRegistry.discover(ROOT / "models").default_version()
    assert shipped != STABLE
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / STABLE, models / STABLE)
    run_ok(
        "quantize_model.py",
        "--keras", str(ROOT / "models" / shipped / "mnist_cnn.keras"),
        "--models-dir", str(models),
        "--stable", STABLE,
        "--latency-repeats", "8",
    )  # fmt: skip
    (new,) = [path for path in models.iterdir() if path.name != STABLE]
    card = json.loads((new / "model_card.json").read_text())
    assert card["release_gate"]["passed"] is True and card["release_gate"]["stable"] == STABLE
    assert card["proposed"] == {"strategy": "canary", "candidate_share": 0.1}
    assert pending_proposal(ModelRegistry.discover(models)) == Proposal(new.name)
    reference = json.loads((ROOT / "models" / shipped / "model_card.json").read_text())
    for key in ("accuracy_int8", "user_style_accuracy", "printed_accuracy"):
        assert card["metrics"][key] == pytest.approx(reference["metrics"][key], abs=0.002), key
    report = (new / "training_report.md").read_text()
    assert "**passed**" in report and f"{STABLE} (stable)" in report
