"""Deployments in one process (shared helpers: tests/deployment/helpers.py, fixtures:
tests/deployment/conftest.py): the `deploy` CLI.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from apiflask import APIFlask

from mnist_api import create_app
from mnist_api.config import PROJECT_ROOT, ConfigError, Settings
from mnist_api.deployment.manager import DeploymentManager
from mnist_api.deployment.router import DeploymentRouter
from mnist_api.deployment.store import SqlDeploymentStore
from mnist_api.extensions import DEPLOYMENTS, ROUTER
from mnist_api.http.auth import admin_identity
from tests.deployment.helpers import (
    ADMIN,
    ADMIN_HEADERS,
    USER_HEADERS,
    png_of,
)
from tools.services import API_KEYS, TEST_SECRET_KEY, free_port, venv_env

# --- the CLI ---


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_api.deployment.cli", *args],
        cwd=PROJECT_ROOT,
        env=venv_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cli_changes_the_stored_deployment(
    database_url: str, two_versions: tuple[Path, str, str]
) -> None:
    folder, stable, bad = two_versions
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": "",  # the deployment needs no Redis
        "MODELS_DIR": str(folder),
        "DEFAULT_MODEL_VERSION": stable,
    }
    status = cli("status", **env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["strategy"] == "single"

    canary = cli("canary", bad, "0.25", **env)
    assert canary.returncode == 0, canary.stderr
    shown = json.loads(canary.stdout)
    assert (shown["strategy"], shown["candidate"], shown["candidate_share"]) == (
        "canary",
        bad,
        0.25,
    )
    assert shown["updated_by"] == "cli"
    stored = SqlDeploymentStore.from_url(database_url).load()
    assert stored is not None and stored.id == shown["id"]

    for args, says in [
        (("canary", bad, "1.5"), "from 0 to 1"),
        (("canary", bad, "half"), "SHARE must be a number"),
        (("shadow", "0123456789ab"), "not installed"),
        (("ab", stable, "0.5"), "candidate is the stable"),
        (("teleport",), "invalid choice"),
    ]:
        refused = cli(*args, **env)
        assert refused.returncode == 2, (args, refused.stdout)
        assert says in refused.stderr, (args, refused.stderr)
    assert json.loads(cli("status", **env).stdout)["id"] == shown["id"]

    promoted = json.loads(cli("promote", **env).stdout)
    assert (promoted["stable"], promoted["strategy"]) == (bad, "single")
    rolled = json.loads(cli("rollback", **env).stdout)
    assert rolled["stable"] == stable
    history = json.loads(cli("history", "5", **env).stdout)
    assert [entry["reason"] for entry in history] == ["rollback", "promote", "manual"]


def test_the_cli_reports_the_database_down(two_versions: tuple[Path, str, str]) -> None:
    result = cli(
        "shadow",
        two_versions[2],
        MODELS_DIR=str(two_versions[0]),
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/none",  # nobody listens
    )
    assert result.returncode == 3
    assert "nothing was changed" in result.stderr


def test_the_manager_api_for_other_code(
    two_versions: tuple[Path, str, str], database_url: str
) -> None:
    """The calls the retrain pipeline and the release phase make."""
    folder, stable, bad = two_versions
    manager = DeploymentManager.from_settings(
        Settings(api_keys=API_KEYS, models_dir=folder, database_url=database_url),
        (stable, bad),
        stable,
    )
    proposed = manager.apply(
        {"strategy": "shadow", "candidate": bad}, by="retrain", reason="manual"
    )
    assert manager.current() == proposed
    assert manager.history(1)[0]["updated_by"] == "retrain"
    assert manager.describe(proposed)["candidate"] == bad
    assert manager.promote(by="release").stable == bad
    assert manager.rollback(by="release", reason="rollback").stable == stable
    with pytest.raises(ValueError, match="reason"):
        manager.apply({}, by="x", reason="because")


def test_an_unexpected_upload_error_counts_against_its_version(
    deploy_app: APIFlask, two_versions: tuple[Path, str, str]
) -> None:
    """The guard's error signal: an inference that raises is counted for its version."""
    router: DeploymentRouter = deploy_app.extensions[ROUTER]
    manager: DeploymentManager = deploy_app.extensions[DEPLOYMENTS]
    bad = two_versions[2]
    router.use(
        manager.apply(
            {
                "strategy": "canary",
                "candidate": bad,
                "candidate_share": 1.0,
                "guard": {"enabled": False},
            },
            by="t",
        )
    )
    model = deploy_app.extensions["mnist_registry"].get(bad)
    original = model.predict

    def broken(images: Any) -> Any:  # a fault a real model cannot be made to produce on demand
        raise RuntimeError("interpreter failed")

    model.predict = broken
    try:
        client = deploy_app.test_client()
        response = client.post(
            "/predict", data={"file": (io.BytesIO(png_of(9)), "9.png")}, headers=USER_HEADERS
        )
        assert response.status_code == 500
    finally:
        model.predict = original
    router.sync()
    counts = router.manager.store.counts(router.deployment.id)
    assert sum(fields.get("errors", 0) for fields in counts.values()) == 1
    # One key's failure is no evidence yet (EVIDENCE_MIN_KEYS): the guard waits for more keys.
    assert router._stats(router.deployment.id, bad).errors == 0


def test_the_deployment_routes_count_against_the_per_key_rate_limit(
    two_versions: tuple[Path, str, str], database_url: str
) -> None:
    settings = Settings(
        api_keys=API_KEYS,
        secret_key=TEST_SECRET_KEY,
        admin_api_keys=(ADMIN,),
        models_dir=two_versions[0],
        database_url=database_url,
        rate_limit="2/minute",
        log_format="text",
        log_level="ERROR",
    )
    application = create_app(settings, load_model=False)
    try:
        client = application.test_client()
        codes = [client.get("/deployment", headers=USER_HEADERS).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        limited = client.put("/deployment", json={}, headers=ADMIN_HEADERS)
        for _ in range(2):
            limited = client.put("/deployment", json={}, headers=ADMIN_HEADERS)
        assert (limited.status_code, limited.get_json()["code"]) == (429, "rate_limited")
    finally:
        application.extensions[ROUTER].close()


def test_admin_keys_may_be_named_and_plain_keys_keep_working() -> None:
    settings = Settings.from_env(
        {"API_KEY": "k", "ADMIN_API_KEYS": "alice:s3cret:with-colon, plainkey, 9x:y"}
    )
    # "9x" is no name (names start with a letter): the whole entry is a plain key.
    assert settings.admin_api_keys == ("s3cret:with-colon", "plainkey", "9x:y")
    assert settings.admin_names == (("s3cret:with-colon", "alice"),)
    assert "s3cret:with-colon" in settings.api_keys and "alice" not in str(settings.api_keys)
    assert admin_identity("s3cret:with-colon", settings.admin_names, "secret") == "alice"
    plain = admin_identity("plainkey", settings.admin_names, "secret")
    # Keyed: another server secret gives another fingerprint, and none is the old plain hash.
    assert plain != admin_identity("plainkey", settings.admin_names, "another secret")
    assert hashlib.sha256(b"plainkey").hexdigest()[:8] not in plain


def test_a_named_admin_is_named_in_the_history(
    two_versions: tuple[Path, str, str], database_url: str
) -> None:
    settings = Settings.from_env(
        {
            "API_KEYS": ",".join(API_KEYS),
            "ADMIN_API_KEYS": f"alice:{ADMIN}",
            "SECRET_KEY": TEST_SECRET_KEY,
            "MODELS_DIR": str(two_versions[0]),
            "DATABASE_URL": database_url,
            "RATE_LIMIT": "off",
            "LOG_FORMAT": "text",
        }
    )
    application = create_app(settings, load_model=False)
    try:
        client = application.test_client()
        changed = client.put(
            "/deployment",
            json={"strategy": "shadow", "candidate": two_versions[2]},
            headers=ADMIN_HEADERS,
        )
        assert changed.status_code == 200 and changed.get_json()["updated_by"] == "alice"
        entry = client.get("/deployment/history", headers=USER_HEADERS).get_json()["history"][0]
        assert entry["updated_by"] == entry["deployment"]["updated_by"] == "alice"
    finally:
        application.extensions[ROUTER].close()


def test_without_a_secret_key_the_service_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings(api_keys=API_KEYS).validate()


def test_deployment_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "API_KEYS": "one,two",
            "ADMIN_API_KEYS": "boss, two",
            "AUTO_PROMOTE": "1",
            "GUARD_MIN_REQUESTS": "50",
            "GUARD_MAX_LOW_CONFIDENCE_DELTA": "0.2",
        }
    )
    assert settings.api_keys == ("one", "two", "boss")  # an admin key is an API key too
    assert settings.admin_api_keys == ("boss", "two")
    assert settings.auto_promote is True
    assert (settings.guard_min_requests, settings.guard_max_low_confidence_delta) == (50, 0.2)
    assert Settings.from_env({}).auto_promote is False
    with pytest.raises(ConfigError, match="GUARD_MAX_ERROR_DELTA"):
        Settings.from_env({"API_KEY": "k", "GUARD_MAX_ERROR_DELTA": "5"}).validate()
    with pytest.raises(ConfigError, match="GUARD_MIN_REQUESTS"):
        Settings.from_env({"GUARD_MIN_REQUESTS": "0"})
