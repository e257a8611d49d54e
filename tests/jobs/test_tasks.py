"""Async predictions on Celery: a real worker process against a real redis-server."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from apiflask import APIFlask
from flask.testing import FlaskClient

from mnist_api.app import create_app
from mnist_api.config import UPLOAD_OVERHEAD_BYTES, ConfigError, Settings
from mnist_api.deployment.notify import CHANNEL
from mnist_api.jobs.celery_app import celery_config
from mnist_api.jobs.store import FileJobStore, local_results_folder
from tests.http.test_errors import BAD_FILES, assert_contract_error
from tests.samples import as_paper, encode, sample
from tests.worker_process import Worker
from tools.redis_server import RedisServer
from tools.services import free_port, start_web, stop


@pytest.fixture
def queue_app(settings: Settings, redis_server: RedisServer) -> APIFlask:
    return create_app(settings.replace(redis_url=redis_server.url))


@pytest.fixture
def queue_client(queue_app: APIFlask) -> FlaskClient:
    return queue_app.test_client()


def png(digit: int) -> bytes:
    return encode(as_paper(sample(digit)))


def submit(client: FlaskClient, data: bytes, auth: dict[str, str]) -> str:
    response = client.post(
        "/predict_async",
        data=data,
        headers={**auth, "Content-Type": "image/png", "X-Request-ID": "job-1"},
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["status_url"] == f"/tasks/{body['task_id']}"
    assert response.headers["Location"] == body["status_url"]
    return str(body["task_id"])


def poll(
    client: FlaskClient, task_id: str, auth: dict[str, str], until: str, timeout: float = 30.0
) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        response = client.get(f"/tasks/{task_id}", headers=auth)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        if body["state"] == until:
            return body
        assert body["state"] != "FAILURE", body
        time.sleep(0.1)
    raise TimeoutError(f"task {task_id} still {body} after {timeout} s")


def test_worker_answers_like_predict(
    queue_client: FlaskClient, start_worker: Callable[..., Worker], auth: dict[str, str]
) -> None:
    worker = start_worker()
    data = png(6)
    task_id = submit(queue_client, data, auth)
    done = poll(queue_client, task_id, auth, "SUCCESS")
    direct = queue_client.post(
        "/predict", data=data, headers={**auth, "Content-Type": "image/png"}
    ).get_json()
    assert direct["cached"] is True  # the worker stored its answer in the shared cache
    assert done["result"][
        "prediction_id"
    ]  # for the key that queued it (tests/feedback/test_feedback.py)
    assert {**done["result"], "cached": True, "prediction_id": ""} == {
        **direct,
        "prediction_id": "",
    }
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any(
        line.get("request_id") == "job-1" and line["message"] == "task done" for line in lines
    )


def test_pending_until_a_worker_runs_it(
    queue_client: FlaskClient, start_worker: Callable[..., Worker], auth: dict[str, str]
) -> None:
    task_id = submit(queue_client, png(2), auth)
    body = queue_client.get(f"/tasks/{task_id}", headers=auth).get_json()
    assert body["state"] == "PENDING" and body["status"]
    start_worker()
    assert poll(queue_client, task_id, auth, "SUCCESS")["result"]["prediccion"] in range(10)


def test_cached_upload_completes_at_once(queue_client: FlaskClient, auth: dict[str, str]) -> None:
    data = png(4)
    queue_client.post("/predict", data=data, headers={**auth, "Content-Type": "image/png"})
    task_id = submit(queue_client, data, auth)  # no worker is running
    body = queue_client.get(f"/tasks/{task_id}", headers=auth).get_json()
    assert body["state"] == "SUCCESS"
    assert body["result"]["cached"] is True


def test_task_survives_its_worker_being_killed(
    settings: Settings,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
) -> None:
    env = {"TASK_DELAY_SECONDS": "3", "BROKER_VISIBILITY_TIMEOUT": "2"}
    app = create_app(settings.replace(redis_url=redis_server.url, broker_visibility_timeout=2))
    client = app.test_client()
    first = start_worker(**env)
    task_id = submit(client, png(8), auth)
    poll(client, task_id, auth, "STARTED", timeout=30)
    first.kill()  # mid-task: the message was not acknowledged
    start_worker(**env)
    done = poll(client, task_id, auth, "SUCCESS", timeout=90)
    assert done["result"]["prediccion"] in range(10)


@pytest.mark.parametrize("name", ["truncated_png", "pdf", "pixel_bomb", "blank_white"])
def test_bad_uploads_are_refused_synchronously(
    queue_client: FlaskClient, auth: dict[str, str], name: str
) -> None:
    make, status, code = BAD_FILES[name]
    response = queue_client.post(
        "/predict_async", data=make(), headers={**auth, "Content-Type": "image/png"}
    )
    assert_contract_error(response, status, code)


def test_unknown_task_ids_are_404(queue_client: FlaskClient, auth: dict[str, str]) -> None:
    for task_id in (str(uuid.uuid4()), "not-a-uuid", "x" * 300):
        assert_contract_error(
            queue_client.get(f"/tasks/{task_id}", headers=auth), 404, "task_not_found"
        )


def test_tasks_need_the_key(queue_client: FlaskClient) -> None:
    assert_contract_error(queue_client.get(f"/tasks/{uuid.uuid4()}"), 401, "unauthorized")
    assert_contract_error(queue_client.post("/predict_async", data=png(1)), 401, "unauthorized")


def test_broker_down_is_503_and_nothing_is_accepted(
    settings: Settings, auth: dict[str, str]
) -> None:
    app = create_app(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    client = app.test_client()
    started = time.monotonic()
    response = client.post(
        "/predict_async", data=png(5), headers={**auth, "Content-Type": "image/png"}
    )
    assert time.monotonic() - started < 5
    assert_contract_error(response, 503, "broker_unavailable")
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["broker"] == "down"
    # the synchronous path still serves
    sync = client.post("/predict", data=png(5), headers={**auth, "Content-Type": "image/png"})
    assert sync.status_code == 200


def test_redis_killed_after_accepting_then_back(
    queue_client: FlaskClient,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
) -> None:
    task_id = submit(queue_client, png(3), auth)
    redis_server.kill()
    assert_contract_error(
        queue_client.get(f"/tasks/{task_id}", headers=auth), 503, "broker_unavailable"
    )
    redis_server.start()  # an empty Redis: the queued job was lost with it
    assert_contract_error(
        queue_client.get(f"/tasks/{task_id}", headers=auth), 404, "task_not_found"
    )


def test_eager_mode_without_a_broker(client: FlaskClient, auth: dict[str, str]) -> None:
    assert client.get("/readyz").get_json()["broker"] == "eager"
    task_id = submit(client, png(7), auth)
    body = client.get(f"/tasks/{task_id}", headers=auth).get_json()
    assert body["state"] == "SUCCESS"
    assert body["result"]["prediccion"] in range(10)
    assert client.application.extensions["mnist_job_store"].held_bytes() == 0  # released


def test_celery_settings(settings: Settings) -> None:
    config = celery_config(settings.replace(redis_url="rediss://:pw@example:6380/0"))
    assert config["accept_content"] == ["json"] == config["result_accept_content"]
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["result_expires"] == settings.result_expires_seconds
    assert config["broker_use_ssl"]["ssl_cert_reqs"] == 0  # ssl.CERT_NONE
    assert celery_config(settings)["task_always_eager"] is True


def keys(server: RedisServer) -> set[bytes]:
    return set(server.client().keys("*"))


def upload_keys(server: RedisServer) -> set[bytes]:
    return {key for key in keys(server) if key.startswith(b"upload")}


def wait_for_keys(server: RedisServer, expected: set[bytes], timeout: float = 30.0) -> None:
    """Until Redis holds exactly `expected` (keys with a TTL go by themselves)."""
    deadline = time.monotonic() + timeout
    while keys(server) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert keys(server) == expected, keys(server) - expected


def test_async_jobs_leave_nothing_behind(
    settings: Settings,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
) -> None:
    """Uploads go when their task ran; results, ids and cache entries with their TTLs."""
    short = {"RESULT_EXPIRES_SECONDS": "3", "CACHE_TTL_SECONDS": "3"}
    start_worker(**short)
    baseline = keys(redis_server)  # only Celery's own bindings: _kombu.binding*
    assert all(key.startswith(b"_kombu.binding") for key in baseline), baseline
    app = create_app(
        settings.replace(redis_url=redis_server.url, result_expires_seconds=3, cache_ttl_seconds=3)
    )
    client = app.test_client()
    uploads = [png(1), png(2), png(2), png(3) + b"\0"]  # two jobs share one upload
    task_ids = [submit(client, data, auth) for data in uploads]
    for task_id in task_ids:
        poll(client, task_id, auth, "SUCCESS")
    assert not upload_keys(redis_server)  # deleted when their tasks ran, not by the TTL
    cached = submit(client, png(1), auth)  # answered from the cache at once
    assert poll(client, cached, auth, "SUCCESS")["result"]["cached"] is True
    # No result channel left subscribed (the deployment's change channel is meant to stay).
    channels = set(redis_server.client().pubsub_channels()) - {CHANNEL.encode()}
    assert not channels
    wait_for_keys(redis_server, baseline)  # results, task ids and cache entries expired


def test_jobs_sharing_an_upload_each_get_it(
    queue_client: FlaskClient,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
) -> None:
    """The first task's cleanup must not take the upload from the second, still queued."""
    data = png(9) + b"shared"
    first, second = submit(queue_client, data, auth), submit(queue_client, data, auth)
    sha = hashlib.sha256(data).hexdigest()
    holders = redis_server.client().smembers(f"upload-holders:{sha}")
    assert holders == {first.encode(), second.encode()}
    start_worker()  # one process: the two tasks run one after the other
    for task_id in (first, second):
        assert poll(queue_client, task_id, auth, "SUCCESS")["result"]["prediccion"] in range(10)
    assert not upload_keys(redis_server)


def test_async_upload_cap_and_queue_budget(
    settings: Settings,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
) -> None:
    uploads = [png(digit) for digit in range(4)]
    size = max(len(data) for data in uploads)
    budget = 3 * (size + UPLOAD_OVERHEAD_BYTES)  # each upload is charged its overhead too
    app = create_app(
        settings.replace(
            redis_url=redis_server.url, async_max_upload_bytes=size, async_queue_max_bytes=budget
        )
    )
    client = app.test_client()
    headers = {**auth, "Content-Type": "image/png"}
    too_big = client.post("/predict_async", data=uploads[0] + b"\0" * size, headers=headers)
    assert_contract_error(too_big, 413, "payload_too_large")
    accepted = [submit(client, data, auth) for data in uploads[:3]]  # no worker yet
    full = client.post("/predict_async", data=uploads[3], headers=headers)
    assert_contract_error(full, 503, "queue_full")
    assert int(full.headers["Retry-After"]) > 0
    assert app.extensions["mnist_job_store"].held_bytes() <= budget
    start_worker()
    for task_id in accepted:
        poll(client, task_id, auth, "SUCCESS")
    assert app.extensions["mnist_job_store"].held_bytes() == 0  # the budget is free again
    poll(client, submit(client, uploads[3], auth), auth, "SUCCESS")


def test_async_settings() -> None:
    defaults = Settings.from_env({})
    assert defaults.result_expires_seconds == 3600
    assert defaults.async_max_upload_bytes == 2 * 1024 * 1024
    assert defaults.async_queue_max_bytes == 8 * 1024 * 1024
    with pytest.raises(ConfigError, match="ASYNC_QUEUE_MAX_BYTES"):
        Settings.from_env({"ASYNC_QUEUE_MAX_BYTES": "10", "API_KEY": "k"}).validate()


def final_state(
    client: FlaskClient, task_id: str, auth: dict[str, str], timeout: float = 120.0
) -> dict:
    """Poll until SUCCESS or FAILURE (a 202-accepted job always ends in one of them)."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        response = client.get(f"/tasks/{task_id}", headers=auth)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        if body["state"] in ("SUCCESS", "FAILURE"):
            return body
        time.sleep(0.1)
    raise TimeoutError(f"task {task_id} still {body} after {timeout} s")


def test_poison_upload_is_dead_lettered_and_the_worker_goes_on(
    queue_client: FlaskClient,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
) -> None:
    poison = png(4) + b"poison"
    sha = hashlib.sha256(poison).hexdigest()
    worker = start_worker(TASK_CRASH_ON_SHA256=sha)
    task_id = submit(queue_client, poison, auth)
    body = final_state(queue_client, task_id, auth)
    assert body["state"] == "FAILURE" and body["code"] == "dead_lettered", body
    assert body["status"]
    # it killed its worker process on each of its 3 deliveries, then was not run again
    assert worker.log().count("TASK_CRASH_ON_SHA256: this worker process exits now") == 3
    server = redis_server.client()
    assert server.lrange("dead:tasks", 0, -1) == [task_id.encode()]
    assert 0 < server.ttl("dead:tasks") <= Settings().result_expires_seconds
    assert not upload_keys(redis_server)  # its upload went with it
    assert not server.keys("deliveries:*")
    # the worker (its main process, with a fresh pool process) serves the next job
    assert worker.process.poll() is None
    assert poll(queue_client, submit(queue_client, png(5), auth), auth, "SUCCESS")


def test_transient_redis_stall_is_retried(
    settings: Settings,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
) -> None:
    """Redis stops answering while the task reads its upload: the task retries, then succeeds."""
    worker = start_worker(TASK_DELAY_SECONDS="3")
    client = create_app(settings.replace(redis_url=redis_server.url)).test_client()
    task_id = submit(client, png(6) + b"stall", auth)
    server = redis_server.client()
    deadline = time.monotonic() + 60
    while b'"STARTED"' not in (server.get(f"celery-task-meta-{task_id}") or b""):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    # The task now sleeps 3 s, then reads its upload: Redis answers nobody for 5 s, so that
    # read (about 3 s from now) times out (the job store waits 1 s) and the task is retried
    # with a backoff; sending the retry waits for the pause's last second.
    server.execute_command("CLIENT", "PAUSE", "5000", "ALL")
    time.sleep(5.5)
    done = poll(client, task_id, auth, "SUCCESS", timeout=60)
    assert done["result"]["prediccion"] in range(10)
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any("retry" in line["message"].lower() for line in lines), worker.log()[-2000:]
    assert not upload_keys(redis_server)


@pytest.mark.parametrize(
    ("soft", "hard", "expected_log"),
    [(1, 30, "SoftTimeLimitExceeded"), (0, 2, "Hard time limit")],
    ids=["soft", "hard"],
)
def test_a_task_that_hangs_fails_at_its_time_limit(
    settings: Settings,
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    auth: dict[str, str],
    soft: int,
    hard: int,
    expected_log: str,
) -> None:
    # The limits travel in the task message, so the web app sets them (as on Heroku, where
    # web and worker dynos share the environment).
    limits = {"TASK_SOFT_TIME_LIMIT": str(soft), "TASK_TIME_LIMIT": str(hard)}
    worker = start_worker(TASK_DELAY_SECONDS="20", **limits)
    client = create_app(
        settings.replace(
            redis_url=redis_server.url, task_soft_time_limit=soft, task_time_limit=hard
        )
    ).test_client()
    task_id = submit(client, png(7) + b"hang", auth)
    body = final_state(client, task_id, auth, timeout=60)
    assert body["state"] == "FAILURE" and body["code"] == "task_failed", body
    assert expected_log in worker.log()
    # released even when the process was killed (the main process does it, just after it
    # stored the FAILURE that the poll above saw)
    deadline = time.monotonic() + 10
    while upload_keys(redis_server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not upload_keys(redis_server), worker.log()[-3000:]
    assert worker.process.poll() is None


def test_task_hardening_settings(settings: Settings) -> None:
    defaults = Settings.from_env({})
    assert defaults.task_max_deliveries == 3
    assert not hasattr(defaults, "task_crash_on_sha256")  # a test hook: tests/worker_entry.py
    config = celery_config(settings.replace(redis_url="redis://127.0.0.1:1/0"))
    assert (config["task_soft_time_limit"], config["task_time_limit"]) == (60, 120)
    assert config["worker_deduplicate_successful_tasks"] is True
    unlimited = celery_config(settings.replace(task_soft_time_limit=0, task_time_limit=0))
    assert unlimited["task_soft_time_limit"] is None and unlimited["task_time_limit"] is None


def test_without_redis_any_worker_answers_a_poll(tmp_path: Path) -> None:
    """No REDIS_URL, several gunicorn workers: a poll that reaches another worker still finds
    the task (ids and results are files the workers share), never a 404."""
    jobs = tmp_path / "jobs"
    server = start_web(
        tmp_path, REDIS_URL="", WEB_CONCURRENCY="2", GUNICORN_THREADS="1", LOCAL_JOBS_DIR=str(jobs)
    )
    headers = {"x-api-key": server.api_key, "Connection": "close"}
    try:
        assert requests.get(f"{server.url}/readyz", timeout=10).json()["broker"] == "eager"
        pids = server.worker_pids_when(2)
        statuses: list[int] = []
        for round_ in range(10):  # rounds until both workers have answered polls
            accepted = []
            for digit in range(5):
                response = requests.post(
                    f"{server.url}/predict_async",
                    data=png(digit) + bytes([round_]),
                    headers={**headers, "Content-Type": "image/png"},
                    timeout=10,
                )
                assert response.status_code == 202, response.text
                accepted.append(response.json()["status_url"])

            def poll_once(url: str) -> tuple[int, str]:
                answer = requests.get(f"{server.url}{url}", headers=headers, timeout=10)
                return answer.status_code, answer.json().get("state", "")

            with ThreadPoolExecutor(max_workers=4) as pool:
                answers = list(pool.map(poll_once, accepted * 4))
            statuses += [status for status, _ in answers]
            assert answers == [(200, "SUCCESS")] * len(answers), answers
            polled_by = {r["pid"] for r in server.records() if r.get("route") == "/tasks/<task_id>"}
            if polled_by == pids:
                break
        assert polled_by == pids, "the polls never reached both workers"
    finally:
        stop(server.process)
    assert statuses and set(statuses) == {200}
    assert (jobs / "tasks").is_dir() and (jobs / "results").is_dir()


def test_local_job_files_expire(tmp_path: Path) -> None:
    store = FileJobStore(tmp_path / "jobs", ttl_seconds=60, max_held_bytes=1 << 20)
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    store.issue(old)
    store.issue(new)
    result = local_results_folder(tmp_path / "jobs") / f"celery-task-meta-{old}"
    result.write_bytes(b"{}")
    stale = time.time() - 120
    for path in (tmp_path / "jobs" / "tasks" / old, result):
        os.utime(path, (stale, stale))
    assert not store.was_issued(old) and store.was_issued(new)
    assert store.prune() == 2
    assert sorted(p.name for p in (tmp_path / "jobs" / "tasks").iterdir()) == [new]
