"""Fixtures of the in-process deployment tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.extensions import ROUTER
from tests.deployment.helpers import ADMIN, ADMIN_HEADERS, migrated_database
from tools.services import API_KEYS, TEST_SECRET_KEY


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A migrated SQLite database of this test's own (never the repository's file)."""
    return migrated_database(tmp_path)


@pytest.fixture(scope="module")
def deploy_app(
    two_versions: tuple[Path, str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[APIFlask]:
    """An app with two installed versions, an admin key, the deployment in its database."""
    folder, stable, _ = two_versions
    settings = Settings(
        api_keys=API_KEYS,
        secret_key=TEST_SECRET_KEY,
        admin_api_keys=(ADMIN,),
        models_dir=folder,
        default_model_version=stable,
        database_url=migrated_database(tmp_path_factory.mktemp("deploy-db")),
        log_format="text",
        log_level="WARNING",
        rate_limit="",
    )
    application = create_app(settings)
    application.config["TESTING"] = True
    yield application
    application.extensions[ROUTER].close()


@pytest.fixture
def api(deploy_app: APIFlask, two_versions: tuple[Path, str, str]) -> FlaskClient:
    """A client of `deploy_app`, its deployment back to `single` on stable."""
    client = deploy_app.test_client()
    response = client.put(
        "/deployment", json={"strategy": "single", "stable": two_versions[1]}, headers=ADMIN_HEADERS
    )
    assert response.status_code == 200, response.get_json()
    return client
