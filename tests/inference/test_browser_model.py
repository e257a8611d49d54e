"""GET /models/<version>/browser-model: the page's copy of a version, to key holders only."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from flask.testing import FlaskClient

from mnist_api.config import PROJECT_ROOT
from mnist_api.inference.model import DigitModel
from mnist_api.inference.registry import ModelRegistry

MODELS = PROJECT_ROOT / "models"
VERSIONS = sorted(p.name for p in MODELS.iterdir() if (p / "model_card.json").is_file())


def card(version: str) -> dict[str, object]:
    return dict(json.loads((MODELS / version / "model_card.json").read_text()))


@pytest.mark.parametrize("version", VERSIONS)
def test_every_installed_version_ships_a_browser_variant_listed_in_its_card(version: str) -> None:
    entry = card(version)["browser"]
    assert isinstance(entry, dict)
    content = (MODELS / version / entry["file"]).read_bytes()
    assert hashlib.sha256(content).hexdigest() == entry["sha256"]
    assert len(content) == entry["size_bytes"]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_variant_is_the_same_int8_graph_with_float_edges(version: str) -> None:
    """Same digits and the same logits as the server's int8 model on real-looking inputs."""
    server = DigitModel(MODELS / version / "mnist_cnn_int8.tflite")
    server.load()
    variant = Interpreter(model_path=str(MODELS / version / "mnist_cnn_browser.tflite"))
    variant.allocate_tensors()
    [inp], [out] = variant.get_input_details(), variant.get_output_details()
    assert (inp["dtype"], out["dtype"]) == (np.float32, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(50):
        image = np.clip(rng.normal(0.2, 0.35, (28, 28)), 0, 1).astype(np.float32)
        variant.set_tensor(inp["index"], image.reshape(1, 28, 28, 1))
        variant.invoke()
        logits = variant.get_tensor(out["index"])[0].astype(np.float64)
        exp = np.exp(logits - logits.max())
        np.testing.assert_allclose(exp / exp.sum(), server.predict(image[None])[0], atol=1e-5)


def test_route_answers_the_file_and_its_sha256(client: FlaskClient, auth: dict[str, str]) -> None:
    listed = client.get("/models", headers=auth).get_json()["models"]
    for entry in listed:
        browser = entry["browser_model"]
        assert browser["url"] == f"/models/{entry['version']}/browser-model"
        response = client.get(browser["url"], headers=auth)
        assert response.status_code == 200
        assert response.mimetype == "application/octet-stream"
        assert hashlib.sha256(response.data).hexdigest() == browser["sha256"]
        assert response.headers["X-Model-SHA256"] == browser["sha256"]
        assert response.headers["X-Model-Version"] == entry["model_version"]
        assert "private" in response.headers["Cache-Control"]
        # The full version form names the same file.
        again = client.get(f"/models/{entry['model_version']}/browser-model", headers=auth)
        assert again.data == response.data


def test_route_needs_a_key(client: FlaskClient) -> None:
    response = client.get(f"/models/{VERSIONS[0]}/browser-model")
    assert response.status_code == 401
    assert response.get_json()["code"] == "unauthorized"
    response = client.get(f"/models/{VERSIONS[0]}/browser-model", headers={"x-api-key": "nope"})
    assert response.status_code == 401


def test_unknown_version_is_404(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.get("/models/000000000000/browser-model", headers=auth)
    assert response.status_code == 404
    assert response.get_json()["code"] == "model_not_found"


def test_a_variant_that_does_not_match_its_card_is_not_offered(tmp_path: Path) -> None:
    """A tampered (or stale) file: not listed, and the route says 404 browser_model_not_found."""
    version = VERSIONS[0]
    shutil.copytree(MODELS / version, tmp_path / version)
    path = tmp_path / version / "mnist_cnn_browser.tflite"
    path.write_bytes(path.read_bytes() + b"\0")
    registry = ModelRegistry.discover(tmp_path)
    registry.load()
    assert registry.describe()[0]["browser_model"] is None
    with pytest.raises(Exception) as caught:
        registry.browser_model(version)
    assert getattr(caught.value, "code", "") == "browser_model_not_found"


def test_a_version_without_a_variant_gets_404(tmp_path: Path) -> None:
    version = VERSIONS[0]
    shutil.copytree(MODELS / version, tmp_path / version)
    (tmp_path / version / "mnist_cnn_browser.tflite").unlink()
    registry = ModelRegistry.discover(tmp_path)
    registry.load()
    with pytest.raises(Exception) as caught:
        registry.browser_model(version)
    assert getattr(caught.value, "status", 0) == 404
