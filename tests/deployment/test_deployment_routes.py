"""Deployments in one process (shared helpers: tests/deployment/helpers.py, fixtures:
tests/deployment/conftest.py): the admin routes (read, change, promote,
roll back, history), their keys and their errors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.extensions import ROUTER
from mnist_api.http.auth import admin_identity
from tests.deployment.helpers import (
    ADMIN,
    ADMIN_HEADERS,
    ADMIN_ROUTES,
    ROUTES,
    USER_HEADERS,
    png_of,
)
from tools.services import API_KEYS, TEST_SECRET_KEY

# --- the routes ---


def test_the_default_is_single_on_the_default_version(
    api: FlaskClient, two_versions: tuple[Path, str, str]
) -> None:
    body = api.get("/deployment", headers=USER_HEADERS).get_json()
    assert body["strategy"] == "single"
    assert body["stable"] == two_versions[1]
    assert body["candidate"] is None
    assert set(body) >= {
        "id",
        "strategy",
        "stable",
        "candidate",
        "candidate_share",
        "min_share",
        "guard",
        "updated_at",
        "updated_by",
    }
    assert body["min_share"] == 0.05
    assert set(body["guard"]) == {
        "enabled",
        "min_requests",
        "max_low_confidence_delta",
        "max_error_delta",
        "min_feedback",
        "max_accuracy_drop",
    }


def test_put_answers_the_new_deployment_and_routes_by_it(
    api: FlaskClient, two_versions: tuple[Path, str, str]
) -> None:
    _, stable, bad = two_versions
    before = api.get("/deployment", headers=USER_HEADERS).get_json()
    response = api.put(
        "/deployment",
        json={"strategy": "canary", "candidate": f"mnist-cnn-int8-{bad}", "candidate_share": 1},
        headers=ADMIN_HEADERS,
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["strategy"], body["stable"], body["candidate"]) == ("canary", stable, bad)
    assert body["id"] != before["id"]
    # A fingerprint keyed with SECRET_KEY, never the key nor a plain hash of it.
    assert body["updated_by"] == admin_identity(ADMIN, (), TEST_SECRET_KEY)
    assert body["updated_by"].startswith("key-") and len(body["updated_by"]) == 20
    assert hashlib.sha256(ADMIN.encode()).hexdigest()[:8] not in body["updated_by"]
    answer = api.post(
        "/predict", data=png_of(3), headers={**USER_HEADERS, "Content-Type": "image/png"}
    )
    assert answer.headers["X-Model-Version"] == f"mnist-cnn-int8-{bad}"
    roles = {
        m["version"]: m["role"] for m in api.get("/models", headers=USER_HEADERS).json["models"]
    }
    assert roles[stable] == "stable" and roles[bad] == "candidate"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"stable": "0123456789ab"}, "not installed"),
        ({"strategy": "canary", "candidate": "0123456789ab"}, "not installed"),
        ({"strategy": "canary", "candidate": "BAD", "candidate_share": 1.5}, "from 0 to 1"),
        ({"strategy": "canary", "candidate": "BAD", "candidate_share": -0.1}, "from 0 to 1"),
        ({"strategy": "canary", "candidate": "BAD", "candidate_share": "half"}, "from 0 to 1"),
        ({"strategy": "canary", "candidate": "BAD", "candidate_share": True}, "from 0 to 1"),
        ({"strategy": "canary", "candidate": "STABLE"}, "candidate is the stable"),
        ({"strategy": "blue-green", "candidate": "BAD"}, "Unknown strategy"),
        ({"strategy": "canary"}, "needs a candidate"),
        ({"strategy": "shadow", "candidate": None}, "needs a candidate"),
        ({"strategy": "bandit", "candidate": "BAD", "min_share": 0.7}, "at most 0.5"),
        ({"colour": "blue"}, "Unknown field"),
        ({"guard": {"min_requests": 0}}, "at least 1"),
        ({"guard": {"max_error_delta": 2}}, "from 0 to 1"),
        ({"guard": {"enabled": "no"}}, "true or false"),
        ({"guard": {"speed": 1}}, "Unknown guard setting"),
        ({"guard": 3}, "must be an object"),
        ([1, 2], "JSON object"),
        ("not json", "JSON object"),
    ],
)
def test_an_invalid_change_is_400_and_changes_nothing(
    api: FlaskClient, two_versions: tuple[Path, str, str], change: Any, says: str
) -> None:
    _, stable, bad = two_versions
    before = api.get("/deployment", headers=USER_HEADERS).get_json()
    history = api.get("/deployment/history", headers=USER_HEADERS).get_json()["history"]
    if isinstance(change, dict):
        text = json.dumps(change).replace('"BAD"', f'"{bad}"').replace('"STABLE"', f'"{stable}"')
    else:
        text = change if isinstance(change, str) else json.dumps(change)
    response = api.put(
        "/deployment", data=text, headers={**ADMIN_HEADERS, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["code"] == "invalid_deployment"
    assert says in response.get_json()["error"]
    assert api.get("/deployment", headers=USER_HEADERS).get_json() == before
    assert api.get("/deployment/history", headers=USER_HEADERS).get_json()["history"] == history


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_a_valid_non_admin_key_is_403_on_admin_routes(
    api: FlaskClient, method: str, path: str
) -> None:
    before = api.get("/deployment", headers=USER_HEADERS).get_json()
    response = getattr(api, method)(path, json={"strategy": "single"}, headers=USER_HEADERS)
    assert response.status_code == 403
    assert response.get_json()["code"] == "forbidden"
    assert api.get("/deployment", headers=USER_HEADERS).get_json() == before


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("headers", [{}, {"x-api-key": "not-a-key"}])
def test_no_or_a_wrong_key_is_401_on_every_deployment_route(
    api: FlaskClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = getattr(api, method)(path, json={"strategy": "single"}, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["code"] == "unauthorized"


def test_an_admin_key_is_also_an_api_key(api: FlaskClient) -> None:
    response = api.post(
        "/predict", data=png_of(7), headers={**ADMIN_HEADERS, "Content-Type": "image/png"}
    )
    assert response.status_code == 200
    assert api.get("/deployment/history", headers=ADMIN_HEADERS).status_code == 200


def test_without_admin_keys_configured_changes_are_403_with_what_to_set(
    two_versions: tuple[Path, str, str], database_url: str
) -> None:
    settings = Settings(
        api_keys=API_KEYS,
        secret_key=TEST_SECRET_KEY,
        models_dir=two_versions[0],
        log_format="text",
        database_url=database_url,
    )
    application = create_app(settings, load_model=False)
    try:
        response = application.test_client().put(
            "/deployment", json={"strategy": "single"}, headers=USER_HEADERS
        )
        assert response.status_code == 403
        assert "ADMIN_API_KEYS" in response.get_json()["error"]
    finally:
        application.extensions[ROUTER].close()


def test_promote_and_rollback_round_trip_with_history(
    api: FlaskClient, two_versions: tuple[Path, str, str]
) -> None:
    _, stable, bad = two_versions
    api.put(
        "/deployment",
        json={"strategy": "canary", "candidate": bad, "candidate_share": 0.2},
        headers=ADMIN_HEADERS,
    )
    promoted = api.post("/deployment/promote", headers=ADMIN_HEADERS).get_json()
    assert (promoted["strategy"], promoted["stable"], promoted["candidate"]) == (
        "single",
        bad,
        None,
    )
    assert promoted["previous_stable"] == stable
    answer = api.post(
        "/predict", data=png_of(4), headers={**USER_HEADERS, "Content-Type": "image/png"}
    )
    assert answer.headers["X-Model-Version"] == f"mnist-cnn-int8-{bad}"
    rolled = api.post("/deployment/rollback", headers=ADMIN_HEADERS).get_json()
    assert (rolled["strategy"], rolled["stable"], rolled["candidate"]) == ("single", stable, None)
    answer = api.post(
        "/predict", data=png_of(4), headers={**USER_HEADERS, "Content-Type": "image/png"}
    )
    assert answer.headers["X-Model-Version"] == f"mnist-cnn-int8-{stable}"

    history = api.get("/deployment/history?limit=3", headers=USER_HEADERS).get_json()["history"]
    assert [entry["reason"] for entry in history] == ["rollback", "promote", "manual"]
    assert history[0]["deployment"]["id"] == rolled["id"]
    assert history[1]["deployment"]["id"] == promoted["id"]
    assert {entry["updated_by"] for entry in history} == {
        admin_identity(ADMIN, (), TEST_SECRET_KEY)
    }
    assert all(entry["updated_at"] for entry in history)


def test_promote_without_a_candidate_is_400(api: FlaskClient) -> None:
    response = api.post("/deployment/promote", headers=ADMIN_HEADERS)
    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_deployment"


def test_the_deployment_routes_are_documented(api: FlaskClient) -> None:
    spec = api.get("/openapi.json").get_json()
    for method, path in ROUTES:
        operation = spec["paths"][path][method]
        assert operation["summary"]
        assert operation["security"]
    assert "requestBody" in spec["paths"]["/deployment"]["put"]
    assert "403" in spec["paths"]["/deployment"]["put"]["responses"]


def test_the_deployment_info_metric_follows_changes(
    api: FlaskClient, two_versions: tuple[Path, str, str]
) -> None:
    bad = two_versions[2]
    body = api.put(
        "/deployment", json={"strategy": "shadow", "candidate": bad}, headers=ADMIN_HEADERS
    ).get_json()
    text = api.get("/metrics").get_data(as_text=True)
    live = [line for line in text.splitlines() if line.startswith("mnist_deployment_info{")]
    assert len(live) == 1, live  # the previous label set is gone, not left at 1
    assert f'id="{body["id"]}"' in live[0] and 'strategy="shadow"' in live[0]
    assert f'candidate="mnist-cnn-int8-{bad}"' in live[0] and live[0].endswith(" 1.0")
    assert 'mnist_guard_rollbacks_total{signal="low_confidence"}' in text
