"""The deployment files, checked for real, without a Docker engine (shared helpers:
`tests/serving/deploy_files.py`): Heroku's app.json, against the JSON
schema `tests/serving/heroku-app.schema.json` and the settings the service reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mnist_api.config import ConfigError, Settings
from tests.serving.deploy_files import (
    APP_JSON,
    HEROKU_OVERRIDES,
    NOT_IN_APP_JSON,
    assert_ok,
    config_variables,
    procfile,
    procfile_defaults,
    run,
    tool,
)
from tests.serving.test_compose import service
from tests.serving.test_dockerfile import dockerfile, env_values

# --- app.json (Heroku) ---

# Heroku publishes no JSON schema for app.json, and check-jsonschema ships none: this one
# holds the keys Heroku's app.json reference documents.
APP_JSON_SCHEMA = Path(__file__).with_name("heroku-app.schema.json")


def test_app_json_matches_its_schema() -> None:
    checker = tool("check-jsonschema")
    assert_ok(run(checker, "--check-metaschema", APP_JSON_SCHEMA))
    assert_ok(run(checker, "--schemafile", APP_JSON_SCHEMA, APP_JSON))


def test_app_json_has_redis_python_and_the_procfile_processes(app_json: dict[str, Any]) -> None:
    plans = [a if isinstance(a, str) else a["plan"] for a in app_json["addons"]]
    assert any(plan.startswith("heroku-redis:") for plan in plans), "REDIS_URL comes from it"
    assert {"url": "heroku/python"} in app_json["buildpacks"]
    # One formation entry per long-running process type (release is a phase, not a dyno).
    assert set(app_json["formation"]) == set(procfile()) - {"release"}
    assert {"web", "worker"} <= set(app_json["formation"])
    assert all(entry["quantity"] >= 1 for entry in app_json["formation"].values())


def test_app_json_generates_the_api_key(app_json: dict[str, Any]) -> None:
    for name in ("API_KEY", "SECRET_KEY"):
        api_key = app_json["env"][name]
        assert api_key["generator"] == "secret", name
        assert api_key.get("required", True) is True, name
        assert "value" not in api_key, name
    assert app_json["env"]["METRICS_TOKEN"].get("required") is False


def test_app_json_sets_only_variables_the_service_reads(
    app_json: dict[str, Any], read_variables: set[str]
) -> None:
    named = set(app_json["env"])
    unknown = named - read_variables
    assert not unknown, (
        f"app.json sets {sorted(unknown)}, which neither config.py nor the Procfile reads"
    )
    assert not named & {"PORT", "REDIS_URL"}, "Heroku and the add-on set these"


def test_app_json_documents_every_setting() -> None:
    """A new variable in config.py is either offered in app.json or listed here with a reason."""
    named = set(json.loads(APP_JSON.read_text())["env"])
    missing = config_variables() - named - set(NOT_IN_APP_JSON)
    assert not missing, f"add {sorted(missing)} to app.json's env (or to NOT_IN_APP_JSON)"


def test_app_json_values_are_the_service_defaults(app_json: dict[str, Any]) -> None:
    """Each suggested value parses, and is what the service would do without it."""
    defaults = Settings.from_env({})
    shell_defaults = procfile_defaults()
    for name, entry in app_json["env"].items():
        value = entry if isinstance(entry, str) else entry.get("value")
        if value is None:
            continue
        if name in shell_defaults:
            assert value == shell_defaults[name], f"{name}: the Procfile's default is another"
            continue
        if name in HEROKU_OVERRIDES:
            assert value == HEROKU_OVERRIDES[name][0], f"{name}: not the Heroku value"
            Settings.from_env({name: value})  # still parses
            continue
        try:
            settings = Settings.from_env({name: value})
        except ConfigError as exc:
            pytest.fail(f"app.json's {name}={value!r} is refused: {exc}")
        assert settings == defaults, f"app.json's {name}={value!r} is not the default"


def test_forwarded_for_is_trusted_only_behind_the_heroku_router(
    app_json: dict[str, Any], compose: dict[str, Any]
) -> None:
    """Per-IP limits: only Heroku (app.json) trusts one X-Forwarded-For hop; nothing else."""
    assert Settings.from_env({}).proxy_fix_x_for == 0
    assert app_json["env"]["PROXY_FIX_X_FOR"]["value"] == "1"
    assert env_values(dockerfile())["PROXY_FIX_X_FOR"] == "0"
    for name in ("web", "worker"):
        assert str(service(compose, name)["environment"]["PROXY_FIX_X_FOR"]) == "0"
