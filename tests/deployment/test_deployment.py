"""Deployments in one process: the rules, the routes, the choice per request, the guard,
the bandit, auto-promotion, the store's compare-and-set in a real SQLite database (and on a
real PostgreSQL server in tests/deployment/test_deployment_durable.py), and the CLI.

The candidate is a real `.tflite` trained on shuffled labels (the `two_versions` fixture);
gunicorn with two workers is in tests/deployment/test_deployment_live.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient

from mnist_api import create_app, metrics
from mnist_api.config import PROJECT_ROOT, ConfigError, Settings
from mnist_api.deployment.counts import AutoPromote, per_key
from mnist_api.deployment.guard import (
    VersionStats,
    guard_verdict,
    probability_at_least_as_good,
    worse_beyond_margin,
)
from mnist_api.deployment.manager import DeploymentManager
from mnist_api.deployment.router import DeploymentRouter
from mnist_api.deployment.store import MemoryDeploymentStore, SqlDeploymentStore
from mnist_api.deployment.value import Deployment, GuardSettings, ab_position
from mnist_api.errors import DeploymentStoreUnavailable, InvalidDeployment
from mnist_api.extensions import DEPLOYMENTS, ROUTER
from mnist_api.http.auth import admin_identity
from mnist_api.storage import db
from tests.samples import as_paper, encode, sample
from tools.services import API_KEYS, TEST_SECRET_KEY, free_port, venv_env

ADMIN = "admin-key-for-tests"
ADMIN_HEADERS = {"x-api-key": ADMIN}
USER_HEADERS = {"x-api-key": API_KEYS[0]}
ROUTES = [
    ("get", "/deployment"),
    ("put", "/deployment"),
    ("post", "/deployment/promote"),
    ("post", "/deployment/rollback"),
    ("get", "/deployment/history"),
]
ADMIN_ROUTES = [route for route in ROUTES if route[0] != "get"]


def migrated_database(folder: Path) -> str:
    """A fresh SQLite database with every migration applied (the store's tables)."""
    url = f"sqlite:///{folder / 'service.db'}"
    db.upgrade(url)
    return url


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A migrated SQLite database of this test's own (never the repository's file)."""
    return migrated_database(tmp_path)


def png_of(digit: int) -> bytes:
    return encode(as_paper(sample(digit)))


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


def manager_for(installed: tuple[str, ...] = ("aaaaaaaaaaaa", "bbbbbbbbbbbb")) -> DeploymentManager:
    return DeploymentManager(MemoryDeploymentStore(), installed, installed[0])


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


# --- the choice per request ---


KEYS = tuple(f"key{number}" for number in range(10))  # evidence needs EVIDENCE_MIN_KEYS (5)


def observe_many(
    router: DeploymentRouter, version: str, answers: int, low: int, keys: int = 10
) -> None:
    """`answers` routed answers of `version` (the first `low` low-confidence), each a new
    input, spread over `keys` keys as honest traffic would be."""
    for number in range(answers):
        client = KEYS[number % keys]
        router.observe(version, client, [(f"{version}-{number}", number < low)])


def routed(router: DeploymentRouter, client: str = "k", count: int = 1000) -> Counter[str]:
    return Counter(router.route(client).answer for _ in range(count))


def router_with(deployment_changes: dict[str, Any], seed: int = 1) -> DeploymentRouter:
    manager = manager_for()
    router = DeploymentRouter(manager, seed=seed)
    router.close()  # no background thread: the test drives `sync()` itself
    router.use(manager.apply(deployment_changes, by="test"))
    return router


def test_single_and_shadow_answer_from_stable() -> None:
    router = router_with({"strategy": "shadow", "candidate": "bbbbbbbbbbbb"})
    route = router.route("k")
    assert (route.answer, route.shadow) == ("aaaaaaaaaaaa", "bbbbbbbbbbbb")
    router.use(router.manager.apply({"strategy": "single"}, by="test"))
    assert router.route("k").shadow is None
    assert router.roles() == {"aaaaaaaaaaaa": "stable"}


def test_canary_gives_the_candidate_its_share() -> None:
    router = router_with(
        {"strategy": "canary", "candidate": "bbbbbbbbbbbb", "candidate_share": 0.3}
    )
    share = routed(router, count=5000)["bbbbbbbbbbbb"] / 5000
    assert 0.27 < share < 0.33


def test_ab_is_sticky_per_key_and_splits_keys_by_share() -> None:
    router = router_with({"strategy": "ab", "candidate": "bbbbbbbbbbbb", "candidate_share": 0.4})
    groups = {}
    for number in range(400):
        client = f"key{number:03d}"
        answers = routed(router, client, count=5)
        assert len(answers) == 1, f"{client} moved between versions"
        groups[client] = next(iter(answers))
        position = ab_position(client, router.deployment.id)
        assert groups[client] == ("bbbbbbbbbbbb" if position < 0.4 else "aaaaaaaaaaaa")
    share = sum(v == "bbbbbbbbbbbb" for v in groups.values()) / len(groups)
    assert 0.3 < share < 0.5
    # A new deployment (new id) draws the groups again.
    router.use(router.manager.apply({"candidate_share": 0.41}, by="test"))
    moved = sum(router.route(client).answer != version for client, version in groups.items())
    assert moved > 0


@pytest.mark.parametrize("better", ["stable", "candidate"])
def test_the_bandit_sends_most_traffic_to_the_better_version(better: str) -> None:
    router = router_with(
        {"strategy": "bandit", "candidate": "bbbbbbbbbbbb", "guard": {"enabled": False}},
        seed=7,
    )
    good = "aaaaaaaaaaaa" if better == "stable" else "bbbbbbbbbbbb"
    accuracy = {version: 0.6 for version in ("aaaaaaaaaaaa", "bbbbbbbbbbbb")}
    accuracy[good] = 0.95
    outcomes = random.Random(3)
    chosen = []
    for number in range(600):
        version = router.route("k").answer
        chosen.append(version)
        router.record_feedback(
            version, outcomes.random() < accuracy[version], client=KEYS[number % 10]
        )
        if number % 10 == 9:
            router.sync()  # the background loop's refresh: the posteriors learn from it
    late = Counter(chosen[-200:])
    assert late[good] / 200 > 0.8, late
    # ... but never starves the other below min_share (5%), give or take chance.
    assert late[next(v for v in accuracy if v != good)] >= 1
    router.sync()  # the counts go to the store and come back summed
    stats = router.manager.store.counts(router.deployment.id)
    assert sum(fields.get("feedback", 0) for fields in stats.values()) == 600


def test_the_bandit_keeps_min_share_for_each_version() -> None:
    router = router_with(
        {
            "strategy": "bandit",
            "candidate": "bbbbbbbbbbbb",
            "min_share": 0.2,
            "guard": {"enabled": False},
        }
    )
    for number in range(300):
        router.record_feedback("aaaaaaaaaaaa", True, client=KEYS[number % 10])
        router.record_feedback("bbbbbbbbbbbb", False, client=KEYS[number % 10])
    router.sync()
    share = routed(router, count=4000)["bbbbbbbbbbbb"] / 4000
    assert 0.17 < share < 0.23


# --- the guard and auto-promotion ---


def test_the_z_test_needs_more_than_the_margin() -> None:
    assert not worse_beyond_margin(12, 100, 10, 100, 0.05)  # 2 points worse: within margin
    assert worse_beyond_margin(60, 100, 10, 100, 0.10)
    assert not worse_beyond_margin(4, 10, 1, 10, 0.10)  # worse, but too few to be sure
    assert worse_beyond_margin(100, 100, 0, 100, 0.10)  # no spread at all: certain
    assert not worse_beyond_margin(0, 0, 0, 100, 0.0)


def test_the_guard_waits_for_the_minimum_and_names_the_signal() -> None:
    settings = GuardSettings(min_requests=100, min_feedback=50)
    bad = VersionStats(requests=99, low_confidence=99)
    good = VersionStats(requests=500, low_confidence=20)
    assert guard_verdict(good, bad, settings) is None
    verdict = guard_verdict(good, VersionStats(requests=100, low_confidence=90), settings)
    assert verdict is not None and verdict.signal == "low_confidence"
    errors = guard_verdict(good, VersionStats(requests=80, errors=40), settings)
    assert errors is not None and errors.signal == "errors"
    wrong = guard_verdict(
        VersionStats(requests=10, feedback=60, correct=58),
        VersionStats(requests=10, feedback=60, correct=30),
        settings,
    )
    assert wrong is not None and wrong.signal == "accuracy"
    assert (
        guard_verdict(
            good, VersionStats(requests=100, low_confidence=90), GuardSettings(enabled=False)
        )
        is None
    )


def test_the_guard_rolls_back_once_with_a_reason() -> None:
    router = router_with(
        {"strategy": "canary", "candidate": "bbbbbbbbbbbb", "guard": {"min_requests": 50}}
    )
    before = router.deployment
    counter = metrics.GUARD_ROLLBACKS.labels(signal="low_confidence")
    rollbacks = counter._value.get()
    observe_many(router, "aaaaaaaaaaaa", 200, 10)
    observe_many(router, "mnist-cnn-int8-bbbbbbbbbbbb", 60, 50)
    router.sync()
    after = router.deployment
    assert (after.strategy, after.stable, after.candidate) == ("single", "aaaaaaaaaaaa", None)
    entry = router.manager.history(1)[0]
    assert entry["reason"] == "guard" and entry["updated_by"] == "guard"
    assert "low-confidence" in entry["detail"] and "60" in entry["detail"]
    assert counter._value.get() == rollbacks + 1
    # A second worker that decided on the same counts does not roll back twice.
    other = DeploymentRouter(router.manager)
    other.close()
    other.use(before)
    other._evidence = {
        "aaaaaaaaaaaa": VersionStats(requests=200),
        "bbbbbbbbbbbb": VersionStats(requests=60, low_confidence=50),
    }
    other._judge(before)
    assert len(router.manager.history(10)) == 2
    assert counter._value.get() == rollbacks + 1


def test_a_healthy_candidate_is_left_alone() -> None:
    router = router_with(
        {"strategy": "ab", "candidate": "bbbbbbbbbbbb", "guard": {"min_requests": 50}}
    )
    observe_many(router, "aaaaaaaaaaaa", 300, 15)
    observe_many(router, "bbbbbbbbbbbb", 300, 18)
    router.sync()
    assert router.deployment.strategy == "ab"


def test_auto_promotion_is_off_by_default_and_promotes_on_enough_feedback() -> None:
    router = router_with({"strategy": "bandit", "candidate": "bbbbbbbbbbbb"})
    for number in range(300):
        router.record_feedback("aaaaaaaaaaaa", random.random() < 0.9, client=KEYS[number % 10])
        router.record_feedback("bbbbbbbbbbbb", True, client=KEYS[number % 10])
    router.sync()
    assert router.deployment.strategy == "bandit"  # AUTO_PROMOTE is off
    router.auto_promote = AutoPromote(enabled=True, min_feedback=200, probability=0.95)
    router.sync()
    assert (router.deployment.strategy, router.deployment.stable) == ("single", "bbbbbbbbbbbb")
    entry = router.manager.history(1)[0]
    assert entry["reason"] == "auto_promote" and "P(candidate" in entry["detail"]
    assert router.deployment.previous_stable == "aaaaaaaaaaaa"


def test_promotion_probability_is_deterministic() -> None:
    good, worse = VersionStats(feedback=200, correct=190), VersionStats(feedback=200, correct=150)
    assert probability_at_least_as_good(worse, good) > 0.99
    assert probability_at_least_as_good(good, worse) < 0.01
    assert probability_at_least_as_good(worse, good) == probability_at_least_as_good(worse, good)


# --- stores, versions that are not installed, Redis failures ---


def test_a_stored_deployment_with_a_missing_version_is_served_as_well_as_possible() -> None:
    manager = manager_for()
    router = DeploymentRouter(manager)
    router.close()
    unknown = Deployment(
        stable="cccccccccccc", strategy="canary", candidate="aaaaaaaaaaaa", id="x1"
    )
    router.use(unknown)
    assert router.route("k").answer == "aaaaaaaaaaaa"  # the default, since stable is missing
    partial = Deployment(
        stable="bbbbbbbbbbbb",
        strategy="canary",
        candidate="cccccccccccc",
        candidate_share=1.0,
        id="x2",
    )
    router.use(partial)
    assert {router.route("k").answer for _ in range(20)} == {"bbbbbbbbbbbb"}
    assert router.roles() == {"bbbbbbbbbbbb": "stable"}


def test_rollback_without_history_ends_the_experiment_or_is_400() -> None:
    manager = manager_for()
    manager.apply({"strategy": "canary", "candidate": "bbbbbbbbbbbb"}, by="t")
    ended = manager.rollback(by="t")
    assert (ended.strategy, ended.stable, ended.candidate) == ("single", "aaaaaaaaaaaa", None)
    with pytest.raises(InvalidDeployment, match="nothing to roll back"):
        manager.rollback(by="t")


@pytest.fixture
def sql_store(database_url: str) -> Iterator[SqlDeploymentStore]:
    store = SqlDeploymentStore.from_url(database_url)
    yield store
    store.dispose()


def test_sql_compare_and_set_lets_exactly_one_writer_win(
    sql_store: SqlDeploymentStore,
) -> None:
    base = Deployment(stable="aaaaaaaaaaaa").stamped("t")
    assert sql_store.replace("", base, {"reason": "manual"})
    assert not sql_store.replace("", base, {"reason": "manual"})
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def write(number: int) -> None:
        new = Deployment(
            stable="aaaaaaaaaaaa",
            strategy="canary",
            candidate="bbbbbbbbbbbb",
            candidate_share=number / 100,
        ).stamped(f"w{number}")
        barrier.wait()
        results.append(sql_store.replace(base.id, new, {"reason": "manual", "n": number}))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    stored = sql_store.load()
    assert stored is not None
    winner = sql_store.history(1)[0]["n"]
    assert (stored.updated_by, stored.candidate_share) == (f"w{winner}", winner / 100)
    assert len(sql_store.history(100)) == 2


def test_concurrent_changes_through_the_manager_each_land_whole(
    sql_store: SqlDeploymentStore,
) -> None:
    managers = [
        DeploymentManager(sql_store, ("aaaaaaaaaaaa", "bbbbbbbbbbbb"), "aaaaaaaaaaaa")
        for _ in range(2)
    ]
    bodies = [
        {"strategy": "canary", "candidate": "bbbbbbbbbbbb", "candidate_share": 0.2},
        {"strategy": "ab", "candidate": "bbbbbbbbbbbb", "candidate_share": 0.7},
    ]
    barrier = threading.Barrier(2)
    answers: list[Deployment] = []

    def change(number: int) -> None:
        barrier.wait()
        answers.append(managers[number].apply(bodies[number], by=f"m{number}"))

    threads = [threading.Thread(target=change, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = managers[0].current()
    assert final.id in {answer.id for answer in answers}
    body = bodies[0] if final.updated_by == "m0" else bodies[1]
    assert (final.strategy, final.candidate_share) == (body["strategy"], body["candidate_share"])
    assert len({answer.id for answer in answers}) == 2


def test_a_database_down_fails_changes_with_503_and_keeps_serving(tmp_path: Path) -> None:
    url = migrated_database(tmp_path)
    store = SqlDeploymentStore.from_url(url)
    manager = DeploymentManager(store, ("aaaaaaaaaaaa", "bbbbbbbbbbbb"), "aaaaaaaaaaaa")
    router = DeploymentRouter(manager)
    router.close()
    served = manager.apply({"strategy": "shadow", "candidate": "bbbbbbbbbbbb"}, by="t")
    router.use(served)
    # The file goes away (and the pooled connections with it): every query now fails.
    (tmp_path / "service.db").rename(tmp_path / "away.db")
    store.engine.dispose()
    with pytest.raises(DeploymentStoreUnavailable) as raised:
        manager.apply({"strategy": "single"}, by="t")
    assert (raised.value.status, raised.value.code) == (503, "deployment_unavailable")
    observe_many(router, "bbbbbbbbbbbb", 3, 0)
    router.sync()  # logs the outage, keeps everything
    assert router.store_status() == "stale"
    assert router.route("k").shadow == "bbbbbbbbbbbb"
    (tmp_path / "service.db").unlink()  # the empty file SQLite made while looking
    (tmp_path / "away.db").rename(tmp_path / "service.db")
    store.engine.dispose()
    router.sync()  # the counters kept in the process arrive now
    assert router.store_status() == "ok"
    assert manager.current() == served
    kept = per_key(store.counts(served.id))["bbbbbbbbbbbb"]  # counted per key (evidence)
    assert sum(fields["requests"] for fields in kept.values()) == 3
    store.dispose()


def test_put_with_the_store_down_is_503_deployment_unavailable(
    two_versions: tuple[Path, str, str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = Settings(
        api_keys=API_KEYS,
        secret_key=TEST_SECRET_KEY,
        admin_api_keys=(ADMIN,),
        models_dir=two_versions[0],
        database_url=f"sqlite:///{blocker / 'x.db'}",  # a file's "folder": never opens
        log_format="text",
        log_level="ERROR",
        rate_limit="",
    )
    application = create_app(settings, load_model=False)
    try:
        client = application.test_client()
        assert client.get("/deployment", headers=USER_HEADERS).status_code == 200
        response = client.put(
            "/deployment",
            json={"strategy": "shadow", "candidate": two_versions[2]},
            headers=ADMIN_HEADERS,
        )
        assert response.status_code == 503
        assert response.get_json()["code"] == "deployment_unavailable"
        history = client.get("/deployment/history", headers=USER_HEADERS)
        assert (history.status_code, history.get_json()["code"]) == (503, "deployment_unavailable")
        assert application.extensions[ROUTER].deployment.strategy == "single"
    finally:
        application.extensions[ROUTER].close()


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


# --- evidence (issue 21): routed answers only, each (key, input) once ---


def test_repeats_of_one_input_by_one_key_count_once() -> None:
    router = router_with({"strategy": "canary", "candidate": "bbbbbbbbbbbb"})
    for _ in range(5):
        router.observe("bbbbbbbbbbbb", "key0", [("digest-1", True), ("digest-1", True)])
    router.observe("bbbbbbbbbbbb", "key1", [("digest-1", True)])  # another key: new evidence
    router.sync()
    counts = router.manager.store.counts(router.deployment.id)
    assert counts["bbbbbbbbbbbb/key0"]["requests"] == 1
    assert counts["bbbbbbbbbbbb/key1"]["requests"] == 1


def test_pinned_answers_are_not_evidence(
    deploy_app: APIFlask, two_versions: tuple[Path, str, str]
) -> None:
    router: DeploymentRouter = deploy_app.extensions[ROUTER]
    manager: DeploymentManager = deploy_app.extensions[DEPLOYMENTS]
    bad = two_versions[2]
    # A fresh deployment id: the same document as an earlier test's would be a no-op change
    # that keeps that test's counts.
    router.use(manager.apply({"strategy": "single"}, by="t"))
    router.use(
        manager.apply({"strategy": "canary", "candidate": bad, "guard": {"enabled": False}}, by="t")
    )
    client = deploy_app.test_client()
    for digit in range(4):
        pinned = client.post(
            f"/predict?model_version={bad}",
            data={"file": (io.BytesIO(png_of(digit)), f"{digit}.png")},
            headers=USER_HEADERS,
        )
        assert pinned.status_code == 200
    router.sync()
    assert router.manager.store.counts(router.deployment.id) == {}
    routed = client.post(
        "/predict", data={"file": (io.BytesIO(png_of(5)), "5.png")}, headers=USER_HEADERS
    )
    assert routed.status_code == 200
    router.sync()
    counts = router.manager.store.counts(router.deployment.id)
    assert sum(fields.get("requests", 0) for fields in counts.values()) == 1
