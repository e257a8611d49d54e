"""Deployments for real: gunicorn (2 workers, the Procfile) with a real redis-server next
to it, the deployment in the server's own SQLite database (start_web gives it one), two
installed versions (the committed model and a real `.tflite` trained on shuffled labels).

The tests share one server and run in file order; the last one kills Redis. Without Redis,
and with PostgreSQL (down, and outliving the container):
tests/deployment/test_deployment_durable.py.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from prometheus_client.parser import text_string_to_metric_families

from tests.samples import as_paper, mnist_test_split, sample
from tools.redis_server import RedisServer
from tools.services import API_KEYS, LiveServer, free_port, start_web, stop

ADMIN = "live-admin-key"
# Enough keys that an A/B split at 0.5 puts some in each group.
KEYS = (*API_KEYS, *(f"ab-key-{number:02d}" for number in range(30)))
TIMEOUT = 15
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def redis_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis-deploy"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    redis_live: RedisServer,
    two_versions: tuple[Path, str, str],
) -> Iterator[LiveServer]:
    folder, stable, _ = two_versions
    live = start_web(
        tmp_path_factory.mktemp("live-deploy"),
        REDIS_URL=redis_live.url,
        MODELS_DIR=str(folder),
        DEFAULT_MODEL_VERSION=stable,
        API_KEYS=",".join(KEYS),
        ADMIN_API_KEYS=ADMIN,
    )
    try:
        live.worker_pids_when(2)
        yield live
    finally:
        stop(live.process)


_counter = iter(range(10**9))


def unique_png(digit: int = 3) -> bytes:
    """The same digit every time, in a file with a different SHA-256: a cache miss."""
    info = PngInfo()
    info.add_text("n", f"{time.time_ns()}-{next(_counter)}")
    buffer = io.BytesIO()
    image: Image.Image = as_paper(sample(digit))
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def distinct_png(number: int) -> bytes:
    """The `number`-th of many different inputs (test-split digits; one ink pixel changed
    for each pass over the split): evidence counts each (key, normalised input) once."""
    images, _ = mnist_test_split()
    image = images[number % len(images)].copy()
    brightest = int(np.argmax(image))
    image.flat[brightest] = max(0, int(image.flat[brightest]) - 7 * (number // len(images)))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def put(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.put(
        f"{server.url}/deployment", json=body, headers={"x-api-key": ADMIN}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def admin_post(server: LiveServer, path: str) -> dict[str, Any]:
    response = requests.post(f"{server.url}{path}", headers={"x-api-key": ADMIN}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def deployment_seen(server: LiveServer, request_id: str = "") -> dict[str, Any]:
    headers = {"x-api-key": KEYS[0], **({"X-Request-ID": request_id} if request_id else {})}
    response = requests.get(f"{server.url}/deployment", headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def wait_everywhere(server: LiveServer, deployment_id: str, timeout: float = 10.0) -> None:
    """Until every worker has logged `deployment_id` in force, and 20 answers in a row show it.

    The log is the proof per worker: answers alone may all come from the worker that made
    the change, while the other one picks it up at its next refresh.
    """
    deadline = time.monotonic() + timeout
    workers = server.worker_pids()
    message = f"deployment {deployment_id} in force"
    while True:
        assert time.monotonic() < deadline, f"deployment {deployment_id} not on every worker"
        taken = {r["pid"] for r in server.records() if r["message"].startswith(message)}
        if workers <= taken:
            break
        time.sleep(0.1)
    streak = 0
    while streak < 20:
        assert time.monotonic() < deadline, f"deployment {deployment_id} not on every worker"
        streak = streak + 1 if deployment_seen(server)["id"] == deployment_id else 0


def predict(server: LiveServer, key: str = KEYS[0], data: bytes | None = None) -> str:
    response = requests.post(
        f"{server.url}/predict",
        data=data if data is not None else unique_png(),
        headers={"x-api-key": key, **PNG},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == response.json()["model_version"]
    return str(response.json()["model_version"])


def metric_total(server: LiveServer, name: str, **labels: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and all(item.labels.get(k) == v for k, v in labels.items()):
                total += item.value
    return total


def full(version: str) -> str:
    return f"mnist-cnn-int8-{version}"


def test_a_put_reaches_both_workers_within_5_seconds(
    server: LiveServer, two_versions: tuple[Path, str, str]
) -> None:
    bad = two_versions[2]
    changed = put(server, {"strategy": "shadow", "candidate": bad})
    started = time.monotonic()
    seen: list[tuple[float, str, str]] = []  # (seconds after the PUT, request id, id seen)
    number = 0
    # Long enough after 5 s that both workers take some of the requests: one client's
    # requests in a row can all be accepted by the same worker for a while.
    while time.monotonic() - started < 12.0:
        request_id = f"visibility-{number}"
        number += 1
        seen.append(
            (time.monotonic() - started, request_id, deployment_seen(server, request_id)["id"])
        )
        time.sleep(0.05)
    pid_of = {
        record["request_id"]: record["pid"]
        for record in server.records()
        if str(record.get("request_id", "")).startswith("visibility-")
    }
    late = [(pid_of[request_id], shown) for at, request_id, shown in seen if at >= 5.0]
    assert {pid for pid, _ in late} == server.worker_pids(), "both workers answered after 5 s"
    assert all(shown == changed["id"] for _, shown in late), late


def test_canary_at_30_percent_gives_the_candidate_30_percent(
    server: LiveServer, two_versions: tuple[Path, str, str]
) -> None:
    _, stable, bad = two_versions
    changed = put(
        server,
        {
            "strategy": "canary",
            "candidate": bad,
            "candidate_share": 0.3,
            "guard": {"enabled": False},
        },
    )
    wait_everywhere(server, changed["id"])
    answers = Counter(predict(server) for _ in range(300))
    assert set(answers) <= {full(stable), full(bad)}
    assert 0.23 * 300 <= answers[full(bad)] <= 0.37 * 300, answers


def test_ab_keeps_each_key_on_one_version(
    server: LiveServer, two_versions: tuple[Path, str, str]
) -> None:
    _, stable, bad = two_versions
    changed = put(
        server,
        {"strategy": "ab", "candidate": bad, "candidate_share": 0.5, "guard": {"enabled": False}},
    )
    wait_everywhere(server, changed["id"])
    groups = {}
    for key in KEYS:
        versions = {predict(server, key) for _ in range(4)}
        assert len(versions) == 1, f"a key moved between versions: {versions}"
        groups[key] = versions.pop()
    assert set(groups.values()) == {full(stable), full(bad)}, Counter(groups.values())


def test_shadow_answers_from_stable_and_counts_one_agreement_per_miss(
    server: LiveServer, two_versions: tuple[Path, str, str]
) -> None:
    _, stable, bad = two_versions
    changed = put(server, {"strategy": "shadow", "candidate": bad})
    wait_everywhere(server, changed["id"])
    labels = {"stable": full(stable), "candidate": full(bad)}
    before = metric_total(server, "mnist_shadow_predictions_total", **labels)
    misses = [unique_png(digit % 10) for digit in range(25)]
    answered = [predict(server, data=data) for data in misses]
    answered += [predict(server, data=data) for data in misses[:10]]  # cache hits: not scored
    batch = requests.post(
        f"{server.url}/predict/batch",
        files=[("files", (f"{n}.png", unique_png(n), "image/png")) for n in range(5)],
        headers={"x-api-key": KEYS[0]},
        timeout=TIMEOUT,
    )
    assert batch.status_code == 200, batch.text
    answered.append(batch.json()["model_version"])
    assert set(answered) == {full(stable)}
    after = metric_total(server, "mnist_shadow_predictions_total", **labels)
    assert after - before == len(misses) + 5
    disagreed = metric_total(server, "mnist_shadow_predictions_total", agree="false", **labels)
    assert disagreed > 0  # the bad model guesses: it cannot agree with stable every time


def test_promote_and_rollback_round_trip(
    server: LiveServer, two_versions: tuple[Path, str, str]
) -> None:
    _, stable, bad = two_versions
    put(server, {"strategy": "canary", "candidate": bad, "candidate_share": 0.1})
    promoted = admin_post(server, "/deployment/promote")
    assert (promoted["stable"], promoted["strategy"], promoted["candidate"]) == (
        bad,
        "single",
        None,
    )
    wait_everywhere(server, promoted["id"])
    assert {predict(server) for _ in range(10)} == {full(bad)}
    rolled = admin_post(server, "/deployment/rollback")
    assert (rolled["stable"], rolled["strategy"]) == (stable, "single")
    wait_everywhere(server, rolled["id"])
    assert {predict(server) for _ in range(10)} == {full(stable)}
    history = requests.get(
        f"{server.url}/deployment/history",
        headers={"x-api-key": KEYS[1]},
        timeout=TIMEOUT,
    ).json()["history"]
    assert [entry["reason"] for entry in history[:3]] == ["rollback", "promote", "manual"]


def test_the_guard_rolls_back_a_bad_candidate(
    server: LiveServer, two_versions: tuple[Path, str, str]
) -> None:
    _, stable, bad = two_versions
    rollbacks = metric_total(server, "mnist_guard_rollbacks_total")
    changed = put(
        server,
        {
            "strategy": "canary",
            "candidate": bad,
            "candidate_share": 0.5,
            "guard": {"enabled": True, "min_requests": 30},
        },
    )
    wait_everywhere(server, changed["id"])
    deadline = time.monotonic() + 90
    current = deployment_seen(server)
    number = 0
    while current["id"] == changed["id"] and time.monotonic() < deadline:
        # Honest traffic: many keys, each image new (the guard counts evidence, not volume).
        for _ in range(10):
            predict(server, KEYS[number % len(KEYS)], distinct_png(number))
            number += 1
        current = deployment_seen(server)
    assert (current["strategy"], current["stable"], current["candidate"]) == (
        "single",
        stable,
        None,
    ), current
    entry = requests.get(
        f"{server.url}/deployment/history?limit=1", headers={"x-api-key": KEYS[0]}, timeout=TIMEOUT
    ).json()["history"][0]
    assert entry["reason"] == "guard"
    assert "low-confidence" in entry["detail"], entry
    assert entry["deployment"]["id"] == current["id"]
    assert metric_total(server, "mnist_guard_rollbacks_total") == rollbacks + 1
    assert metric_total(server, "mnist_guard_rollbacks_total", signal="low_confidence") >= 1
    assert any("guard rolled back" in record["message"] for record in server.records())


def test_two_admins_at_once_each_change_lands_whole(
    server: LiveServer, two_versions: tuple[Path, str, str]
) -> None:
    bad = two_versions[2]
    bodies = [
        {"strategy": "canary", "candidate": bad, "candidate_share": 0.2, "min_share": 0.1},
        {"strategy": "ab", "candidate": bad, "candidate_share": 0.8, "min_share": 0.3},
    ]
    barrier = threading.Barrier(2)
    answers: list[dict[str, Any]] = []

    def change(body: dict[str, Any]) -> None:
        barrier.wait()
        answers.append(put(server, body))

    threads = [threading.Thread(target=change, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    newest = requests.get(
        f"{server.url}/deployment/history?limit=2", headers={"x-api-key": KEYS[0]}, timeout=TIMEOUT
    ).json()["history"]
    # Both landed, one after the other: the later one is in force, on every worker.
    assert {entry["deployment"]["id"] for entry in newest} == {a["id"] for a in answers}
    wait_everywhere(server, newest[0]["deployment"]["id"])
    final = deployment_seen(server)
    assert final["id"] in {answer["id"] for answer in answers}
    winner = next(body for body in bodies if body["strategy"] == final["strategy"])
    assert {key: final[key] for key in winner} == winner  # whole, not a mix of the two


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"strategy": ' + b"[" * 5000 + b"]" * 5000 + b"}", "json_too_deep"),
        (b'{"strategy": ' + b"[" * 50_000, "json_too_large"),
        (b'{"strategy": "single", "x": [' + b"0," * 20_000 + b"0]}", "json_too_large"),
    ],
)
def test_a_too_deep_or_too_large_json_body_is_a_400_and_changes_nothing(
    server: LiveServer, body: bytes, code: str
) -> None:
    """Issue 22: deeply nested JSON on PUT /deployment was a 500 (RecursionError)."""
    before = deployment_seen(server)
    response = requests.put(
        f"{server.url}/deployment",
        data=body,
        headers={"x-api-key": ADMIN, "Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 400, response.text
    assert response.json() == {"error": response.json()["error"], "code": code}
    assert deployment_seen(server)["id"] == before["id"]


def test_flushdb_after_a_promotion_changes_nothing(
    server: LiveServer, redis_live: RedisServer, two_versions: tuple[Path, str, str]
) -> None:
    """Issue 21: the deployment and its history live in the database, not in Redis. Before,
    FLUSHDB fell back to the first-start default and the history was gone."""
    _, stable, bad = two_versions
    put(server, {"strategy": "canary", "candidate": bad, "candidate_share": 0.1})
    promoted = admin_post(server, "/deployment/promote")
    assert promoted["stable"] == bad
    wait_everywhere(server, promoted["id"])
    history = requests.get(
        f"{server.url}/deployment/history?limit=50", headers={"x-api-key": KEYS[0]}, timeout=TIMEOUT
    ).json()["history"]
    assert redis_live.client().flushdb()
    time.sleep(2.5)  # both workers have refreshed (DEPLOYMENT_REFRESH_SECONDS=1) since
    for _ in range(20):
        seen = deployment_seen(server)
        assert (seen["id"], seen["stable"], seen["strategy"]) == (promoted["id"], bad, "single")
    after = requests.get(
        f"{server.url}/deployment/history?limit=50", headers={"x-api-key": KEYS[0]}, timeout=TIMEOUT
    ).json()["history"]
    assert after == history
    assert Counter(predict(server) for _ in range(10)) == {full(bad): 10}
    back = admin_post(server, "/deployment/rollback")  # for the next test
    assert back["stable"] == stable
    wait_everywhere(server, back["id"])


def test_redis_down_changes_no_decision_and_changes_still_land(
    server: LiveServer, redis_live: RedisServer, two_versions: tuple[Path, str, str]
) -> None:
    """Redis is a cache, a broker and a rate-limit counter: with it gone, the deployment (in
    the database) still serves and still changes."""
    _, stable, bad = two_versions
    changed = put(
        server,
        {
            "strategy": "canary",
            "candidate": bad,
            "candidate_share": 0.5,
            "guard": {"enabled": False},
        },
    )
    wait_everywhere(server, changed["id"])
    redis_live.kill()
    time.sleep(2.5)  # both workers' refresh loops ran with Redis gone
    answers = Counter(predict(server) for _ in range(40))
    assert set(answers) == {full(stable), full(bad)}, answers  # still the canary
    single = put(server, {"strategy": "single"})
    wait_everywhere(server, single["id"])
    assert Counter(predict(server) for _ in range(10)) == {full(stable): 10}
    assert server.process.poll() is None
