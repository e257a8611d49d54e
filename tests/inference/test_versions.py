"""Installed model versions: the registry, GET /models, pinning, X-Model-Version."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient

from mnist_api.config import PROJECT_ROOT, ConfigError
from mnist_api.extensions import SERVICE
from mnist_api.inference.registry import (
    DEFAULT_DEPLOYMENT_FILE,
    ModelRegistry,
    RegistryError,
    short_version,
)
from mnist_api.inference.service import PredictionService
from tests.samples import as_paper, encode, sample

MODELS = PROJECT_ROOT / "models"


def png_of(digit: int) -> bytes:
    return encode(as_paper(sample(digit)))


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    loaded = ModelRegistry.discover(MODELS)
    loaded.load()
    return loaded


def test_every_committed_version_loads_and_is_named_after_its_file(
    registry: ModelRegistry,
) -> None:
    assert registry.versions()
    for model in registry:
        assert model.ready
        assert model.model_path.parent.name == model.version == model.sha256[:12]
        assert model.card["version"] == model.version


def test_versions_are_ordered_by_card_date(registry: ModelRegistry) -> None:
    dates = [model.card.get("created", "") for model in registry]
    assert dates == sorted(dates)
    assert registry.newest == registry.versions()[-1]


def test_short_and_full_forms_name_the_same_version(registry: ModelRegistry) -> None:
    version = registry.versions()[0]
    assert short_version(f"mnist-cnn-int8-{version}") == version
    assert registry.get(f"mnist-cnn-int8-{version}") is registry.get(version)


def test_a_folder_not_named_after_its_file_is_refused(tmp_path: Path) -> None:
    source = next(p for p in MODELS.iterdir() if p.is_dir())
    shutil.copytree(source, tmp_path / "0123456789ab")
    copied = ModelRegistry.discover(tmp_path)
    with pytest.raises(RegistryError, match="0123456789ab"):
        copied.load()


def test_an_empty_models_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model version"):
        ModelRegistry.discover(tmp_path)


def test_models_lists_every_version_with_its_role(
    client: FlaskClient, auth: dict[str, str], app: APIFlask
) -> None:
    response = client.get("/models", headers=auth)
    assert response.status_code == 200
    entries = response.get_json()["models"]
    registry = app.extensions[SERVICE].registry
    assert [entry["version"] for entry in entries] == registry.versions()
    stable = app.extensions[SERVICE].router.stable
    for entry in entries:
        assert set(entry) == {
            "model_version",
            "version",
            "created",
            "metrics",
            "role",
            "browser_model",
        }
        assert entry["model_version"] == f"mnist-cnn-int8-{entry['version']}"
        assert entry["role"] == ("stable" if entry["version"] == stable else None)


def test_models_needs_a_key(client: FlaskClient) -> None:
    response = client.get("/models")
    assert response.status_code == 401
    assert response.get_json()["code"] == "unauthorized"


def test_every_answer_names_its_version_in_body_and_header(
    client: FlaskClient, auth: dict[str, str], app: APIFlask
) -> None:
    response = client.post(
        "/predict", data={"file": (io.BytesIO(png_of(3)), "3.png")}, headers=auth
    )
    assert response.status_code == 200
    assert response.headers["X-Model-Version"] == response.get_json()["model_version"]
    assert response.get_json()["model_version"] == app.extensions[SERVICE].model_version
    batch = client.post(
        "/predict/batch", data={"files": [(io.BytesIO(png_of(1)), "1.png")]}, headers=auth
    ).get_json()
    assert batch["model_version"] == batch["predictions"][0]["model_version"]


@pytest.mark.parametrize("form", ["short", "full"])
def test_pinning_each_installed_version(
    client: FlaskClient, auth: dict[str, str], app: APIFlask, form: str
) -> None:
    for version in app.extensions[SERVICE].registry.versions():
        pin = version if form == "short" else f"mnist-cnn-int8-{version}"
        response = client.post(
            f"/predict?model_version={pin}",
            data=png_of(7),
            headers={**auth, "Content-Type": "image/png"},
        )
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["model_version"] == f"mnist-cnn-int8-{version}"
        assert response.headers["X-Model-Version"] == f"mnist-cnn-int8-{version}"
        assert response.get_json()["prediccion"] == 7
        batch = client.post(
            f"/predict/batch?model_version={pin}",
            data={"files": [(io.BytesIO(png_of(2)), "2.png")]},
            headers=auth,
        )
        assert batch.get_json()["model_version"] == f"mnist-cnn-int8-{version}"
        described = client.get(f"/model?model_version={pin}", headers=auth).get_json()
        assert described["version"] == version


@pytest.mark.parametrize("route", ["/predict", "/predict/batch", "/model"])
def test_pinning_an_uninstalled_version_is_404(
    client: FlaskClient, auth: dict[str, str], route: str
) -> None:
    if route == "/model":
        response = client.get(f"{route}?model_version=0123456789ab", headers=auth)
    else:
        field = "file" if route == "/predict" else "files"
        response = client.post(
            f"{route}?model_version=0123456789ab",
            data={field: (io.BytesIO(png_of(4)), "4.png")},
            headers=auth,
        )
    assert response.status_code == 404
    assert response.get_json()["code"] == "model_not_found"


def test_each_version_has_its_own_cache_entries(app: APIFlask) -> None:
    service: PredictionService = app.extensions[SERVICE]
    data = png_of(5)
    keys = {service.key_for(data, model) for model in service.registry}
    assert len(keys) == len(service.registry.versions())
    assert all(key.startswith("pred:mnist-cnn-int8-") for key in keys)


def test_the_cache_key_carries_the_preprocessing_version(app: APIFlask) -> None:
    service: PredictionService = app.extensions[SERVICE]
    data = png_of(5)
    other = PredictionService(
        service.registry, service.limits, service.cache, service.router, preprocessing="0" * 8
    )
    assert service.key_for(data) != other.key_for(data)
    assert f"+p{service.preprocessing}:" in service.key_for(data)


def test_an_async_job_is_answered_by_the_version_chosen_when_it_was_accepted(
    client: FlaskClient, auth: dict[str, str], app: APIFlask
) -> None:
    for version in app.extensions[SERVICE].registry.versions():
        accepted = client.post(
            f"/predict_async?model_version={version}",
            data=png_of(6) + version.encode(),  # fresh bytes: not answered from the cache
            headers={**auth, "Content-Type": "image/png"},
        )
        assert accepted.status_code == 202, accepted.get_json()
        status = client.get(accepted.get_json()["status_url"], headers=auth).get_json()
        assert status["state"] == "SUCCESS", status
        assert status["result"]["model_version"] == f"mnist-cnn-int8-{version}"
    missing = client.post(
        "/predict_async?model_version=0123456789ab",
        data=png_of(6),
        headers={**auth, "Content-Type": "image/png"},
    )
    assert missing.status_code == 404
    assert missing.get_json()["code"] == "model_not_found"


def with_default_file(tmp_path: Path, content: str) -> ModelRegistry:
    """A copy of the committed versions with `content` as the default-deployment file."""
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    (models / DEFAULT_DEPLOYMENT_FILE).write_text(content)
    return ModelRegistry.discover(models)


def test_the_default_file_names_the_first_stable_and_the_setting_overrides_it(
    tmp_path: Path,
) -> None:
    oldest, *_ = ModelRegistry.discover(MODELS).versions()
    chosen = with_default_file(tmp_path, json.dumps({"stable": oldest}))
    assert chosen.default_version() == oldest
    newest = chosen.versions()[-1]
    assert chosen.default_version(newest) == newest  # DEFAULT_MODEL_VERSION wins


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"stable": "0123456789ab"}', "not installed"),
        ("{not json", "cannot be read"),
        ('["a list"]', "cannot be read"),
        ('{"stable": ""}', "names no stable"),
    ],
)
def test_a_broken_default_file_is_a_config_error(
    tmp_path: Path, content: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        with_default_file(tmp_path, content).default_version()


def test_every_card_reports_accuracy_and_calibration_per_evaluation_set(
    registry: ModelRegistry,
) -> None:
    """Issue 25: per set (test split, user-style, printed, other writers): accuracy, ECE
    over 15 bins, samples; GET /models shows the card's metrics as they are."""
    for model in registry:
        metrics = model.card["metrics"]
        assert 0.0 < metrics["accuracy_int8"] <= 1.0 and 0.0 <= metrics["test_ece"] < 0.2
        for name in ("user_style", "printed", "other_writers"):
            assert 0.0 < metrics[f"{name}_accuracy"] <= 1.0, (model.version, name)
            assert 0.0 <= metrics[f"{name}_ece"] < 0.2, (model.version, name)
            assert metrics[f"{name}_samples"] > 0
