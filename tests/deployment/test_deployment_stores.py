"""Deployments in one process (shared helpers: tests/deployment/helpers.py, fixtures:
tests/deployment/conftest.py): the stores (compare-and-set in a real
SQLite database), versions that are not installed, Redis failures.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.deployment.counts import per_key
from mnist_api.deployment.manager import DeploymentManager
from mnist_api.deployment.router import DeploymentRouter
from mnist_api.deployment.store import SqlDeploymentStore
from mnist_api.deployment.value import Deployment
from mnist_api.errors import DeploymentStoreUnavailable, InvalidDeployment
from mnist_api.extensions import ROUTER
from tests.deployment.helpers import (
    ADMIN,
    ADMIN_HEADERS,
    USER_HEADERS,
    manager_for,
    migrated_database,
)
from tests.deployment.test_deployment_routing import observe_many
from tools.services import API_KEYS, TEST_SECRET_KEY

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
