"""Decisions are durable (issue 21) and data outlives containers (issue 22), for real.

gunicorn (2 workers, the Procfile's web line) without Redis, first on its embedded SQLite
file as `docker run` serves it, then on a real PostgreSQL server as compose and Heroku run
it. Each test is a row of issue 21's table that failed before:

- two workers without Redis each held their own deployment: consecutive GET /deployment
  alternated after an admin PUT;
- GET /deployment/history with a normal key showed 8 hex of the unsalted SHA-256 of the
  admin key;
- retraining with DATABASE_URL only gated against "the newest version not proposed", not
  the stable of the deployment in force;
- a container recreated against the same database lost nothing (compose's `db` service);
- a database that is down keeps serving the last deployment read, says so in /readyz, and
  an admin change gets 503 with nothing changed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from mnist_api.config import PROJECT_ROOT
from mnist_api.inference.registry import ModelRegistry
from mnist_api.storage import db
from tests.samples import as_paper, encode, sample
from tools.postgres_server import PostgresServer, postgres_bin
from tools.redis_server import RedisServer
from tools.services import API_KEYS, LiveServer, free_port, start_web, stop, venv_env

ADMIN = "durable-admin-key"
USER = {"x-api-key": API_KEYS[0]}
ADMIN_HEADERS = {"x-api-key": ADMIN}
TIMEOUT = 15
_COMMITTED = ModelRegistry.discover(PROJECT_ROOT / "models")
# The first-start stable (models/default_deployment.json's choice), and another committed
# version for the canaries and promotions.
STABLE = _COMMITTED.default_version()
NEWER = next(v for v in reversed(_COMMITTED.versions()) if v != STABLE)
REFRESH_SECONDS = 1.0


def full(version: str) -> str:
    return f"mnist-cnn-int8-{version}"


def web(tmp: Path, **env: str) -> LiveServer:
    """The Procfile's web line, 2 workers, an admin key, no Redis unless `env` names one."""
    defaults = {
        "REDIS_URL": "",
        "ADMIN_API_KEYS": ADMIN,
        "DEPLOYMENT_REFRESH_SECONDS": str(REFRESH_SECONDS),
    }
    live = start_web(tmp, **{**defaults, **env})
    live.worker_pids_when(2)
    return live


def get(server: LiveServer, path: str, headers: dict[str, str] | None = None) -> Any:
    response = requests.get(f"{server.url}{path}", headers=headers or USER, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def change(server: LiveServer, method: str, path: str, body: Any = None) -> requests.Response:
    return requests.request(
        method, f"{server.url}{path}", json=body, headers=ADMIN_HEADERS, timeout=TIMEOUT
    )


def predict(server: LiveServer, digit: int = 3) -> requests.Response:
    response = requests.post(
        f"{server.url}/predict",
        data=encode(as_paper(sample(digit))),
        headers={**USER, "Content-Type": "image/png"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    return response


def promote_newer(server: LiveServer) -> dict[str, Any]:
    """Canary on NEWER, then promote it: NEWER is the stable of the deployment in force."""
    reset = change(server, "PUT", "/deployment", {"strategy": "single", "stable": STABLE})
    assert reset.status_code == 200, reset.text
    body = {"strategy": "canary", "candidate": NEWER, "candidate_share": 0.1}
    started = change(server, "PUT", "/deployment", body)
    assert started.status_code == 200, started.text
    promoted = change(server, "POST", "/deployment/promote")
    assert promoted.status_code == 200, promoted.text
    result: dict[str, Any] = promoted.json()
    assert (result["stable"], result["strategy"]) == (NEWER, "single")
    return result


def consecutive_ids(server: LiveServer, count: int = 40) -> list[str]:
    """After DEPLOYMENT_REFRESH_SECONDS (and a margin), `count` consecutive GET /deployment
    (the two workers share the listening socket, so both answer some of them)."""
    time.sleep(REFRESH_SECONDS * 2 + 0.5)
    return [str(get(server, "/deployment")["id"]) for _ in range(count)]


# --- without Redis, on the embedded SQLite file (docker run, make run) ---


@pytest.fixture(scope="module")
def sqlite_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = web(tmp_path_factory.mktemp("durable-sqlite"))
    try:
        yield live
    finally:
        stop(live.process)


def test_two_workers_without_redis_agree_after_an_admin_change(sqlite_web: LiveServer) -> None:
    """Before: each worker held its own deployment, and GET /deployment alternated between
    `canary` and `single`."""
    answer = change(
        sqlite_web,
        "PUT",
        "/deployment",
        {"strategy": "canary", "candidate": NEWER, "candidate_share": 0.2},
    )
    assert answer.status_code == 200, answer.text
    new_id = answer.json()["id"]
    assert Counter(consecutive_ids(sqlite_web)) == {new_id: 40}
    # And the change after it, made on whichever worker, is everyone's as well.
    back = change(sqlite_web, "PUT", "/deployment", {"strategy": "single"})
    assert back.status_code == 200
    assert Counter(consecutive_ids(sqlite_web)) == {back.json()["id"]: 40}


def test_the_history_shows_no_hash_of_the_admin_key(sqlite_web: LiveServer) -> None:
    """Before: `updated_by` was the first 8 hex of the unsalted SHA-256 of the admin key, so
    a normal key could test guesses of a weak admin key offline."""
    shadow = change(sqlite_web, "PUT", "/deployment", {"strategy": "shadow", "candidate": NEWER})
    assert shadow.status_code == 200, shadow.text
    history = get(sqlite_web, "/deployment/history?limit=100")["history"]
    shown = {entry["updated_by"] for entry in history}
    shown |= {entry["deployment"]["updated_by"] for entry in history}
    shown.add(get(sqlite_web, "/deployment")["updated_by"])
    plain = hashlib.sha256(ADMIN.encode()).hexdigest()
    assert not any(plain[:8] in who or who in plain for who in shown), shown
    assert all(who.startswith("key-") and len(who) == 20 for who in shown), shown


def test_with_redis_a_change_is_announced_and_reaches_every_worker_at_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis may carry change notifications: with a refresh tick of a minute, the other
    worker still takes the change within seconds. The database stays the truth: a killed
    Redis fails no change."""
    live = web(tmp_path, REDIS_URL=redis_server.url, DEPLOYMENT_REFRESH_SECONDS="60")
    try:
        workers = live.worker_pids()
        time.sleep(2)  # each worker's listener has subscribed
        answer = change(live, "PUT", "/deployment", {"strategy": "shadow", "candidate": NEWER})
        assert answer.status_code == 200, answer.text
        message = f"deployment {answer.json()['id']} in force"
        deadline = time.monotonic() + 10
        while {r["pid"] for r in live.records() if r["message"].startswith(message)} < workers:
            assert time.monotonic() < deadline, "the change did not reach every worker"
            time.sleep(0.1)
        assert {get(live, "/deployment")["id"] for _ in range(20)} == {answer.json()["id"]}
        redis_server.kill()
        again = change(live, "PUT", "/deployment", {"strategy": "single"})
        assert again.status_code == 200, again.text
    finally:
        stop(live.process)


# --- on a real PostgreSQL server (compose's `db` service, Heroku Postgres) ---


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if postgres_bin() is None:
        pytest.fail("PostgreSQL is not installed: run scripts/install-system-deps.sh")
    server = PostgresServer(free_port())
    server.start()
    try:
        db.upgrade(server.url)  # what the release phase (and compose's `release`) runs
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def pg_web(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[LiveServer]:
    live = web(tmp_path_factory.mktemp("durable-pg"), DATABASE_URL=postgres.url)
    try:
        yield live
    finally:
        stop(live.process)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_retrain_with_database_url_only_gates_against_the_stable_in_force(
    pg_web: LiveServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """Before: without Redis, the gate's stable was the newest version not marked proposed
    (STABLE), although an admin had promoted NEWER."""
    promote_newer(pg_web)
    models = tmp_path / "models"
    shutil.copytree(PROJECT_ROOT / "models", models)
    command = [
        sys.executable, "-m", "training.retrain",
        "--models-dir", str(models), "--report-dir", str(tmp_path / "report"),
        "--epochs", "1", "--subset", "100", "--calibration-samples", "50", "--no-propose",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=venv_env(DATABASE_URL=postgres.url, REDIS_URL=""),
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = (tmp_path / "report" / "retrain_report.md").read_text()
    assert f"- Stable: `{NEWER}`" in report, report


def test_a_recreated_container_keeps_the_deployment_and_the_feedback(
    pg_web: LiveServer, postgres: PostgresServer, tmp_path: Path
) -> None:
    """`docker compose up --force-recreate`: a new container (a fresh instance folder, no
    embedded file) on the same database finds every decision and every feedback."""
    promoted = promote_newer(pg_web)
    time.sleep(REFRESH_SECONDS * 2 + 0.5)  # the other worker has read it too
    answer = predict(pg_web, 7).json()
    assert answer["model_version"] == full(NEWER)
    form: dict[str, Any] = {"label": "7"}
    if "prediction_id" in answer:  # the feedback contract of issue 21, when it is in
        form["prediction_id"] = answer["prediction_id"]
    sent = requests.post(
        f"{pg_web.url}/feedback",
        data=form,
        files={"file": ("7.png", encode(as_paper(sample(7))), "image/png")},
        headers=USER,
        timeout=TIMEOUT,
    )
    assert sent.status_code in (200, 201), sent.text
    history = get(pg_web, "/deployment/history?limit=100")["history"]
    stats = get(pg_web, "/feedback/stats")
    stop(pg_web.process)

    fresh = tmp_path / "new-container"
    fresh.mkdir()
    again = web(fresh, DATABASE_URL=postgres.url)
    try:
        assert get(again, "/deployment")["id"] == promoted["id"]
        assert get(again, "/deployment/history?limit=100")["history"] == history
        assert get(again, "/feedback/stats") == stats
        assert predict(again).json()["model_version"] == full(NEWER)
    finally:
        stop(again.process)


def test_a_database_down_keeps_serving_says_so_and_refuses_changes(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    live = web(tmp_path, DATABASE_URL=postgres.url)
    try:
        # A first start may write a deployment (the release's proposal of a candidate): let
        # both workers read whatever is in force before the database goes away.
        time.sleep(REFRESH_SECONDS * 2 + 0.5)
        in_force = get(live, "/deployment")
        history = get(live, "/deployment/history?limit=100")["history"]
        assert get(live, "/readyz")["deployment"] == "ok"
        postgres.stop()
        time.sleep(REFRESH_SECONDS * 2 + 4)  # every worker's refresh met the outage
        for _ in range(10):  # both workers: each read the deployment before the outage
            ready = requests.get(f"{live.url}/readyz", timeout=TIMEOUT)
            assert ready.status_code == 200
            assert ready.json()["deployment"] == "stale"
            assert get(live, "/deployment")["id"] == in_force["id"]
            assert predict(live).headers["X-Model-Version"] == full(in_force["stable"])
        for method, path, body in (
            ("PUT", "/deployment", {"strategy": "shadow", "candidate": STABLE}),
            ("POST", "/deployment/promote", None),
            ("POST", "/deployment/rollback", None),
        ):
            refused = change(live, method, path, body)
            assert refused.status_code == 503, (path, refused.text)
            assert refused.json()["code"] == "deployment_unavailable"
        postgres.start()
        time.sleep(REFRESH_SECONDS * 2 + 0.5)
        assert get(live, "/deployment")["id"] == in_force["id"]
        assert get(live, "/deployment/history?limit=100")["history"] == history
        assert get(live, "/readyz")["deployment"] == "ok"
    finally:
        stop(live.process)
