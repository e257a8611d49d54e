"""Fixtures of the deployment-file tests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.serving.deploy_files import (
    APP_JSON,
    COMPOSE,
    config_variables,
    load_yaml,
    procfile_defaults,
)


@pytest.fixture(scope="module")
def read_variables() -> set[str]:
    names = config_variables() | set(procfile_defaults())
    # The parser must see the settings it is there for, or every check below is vacuous.
    assert {"API_KEY", "API_KEYS", "PORT", "WEB_CONCURRENCY", "REDIS_URL", "RATE_LIMIT"} <= names
    return names


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = load_yaml(COMPOSE)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def app_json() -> dict[str, Any]:
    document = json.loads(APP_JSON.read_text())
    assert isinstance(document, dict)
    return document
