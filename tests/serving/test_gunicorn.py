"""End to end: the Procfile's gunicorn command as a subprocess, spoken to over HTTP."""

from __future__ import annotations

import http.client
import os
import selectors
import signal
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import requests

from tests.samples import as_paper, encode, sample
from tools.services import LiveServer, start_web, stop


def test_predicts_over_http(live_server: LiveServer) -> None:
    data = encode(as_paper(sample(9)))
    response = requests.post(
        f"{live_server.url}/predict",
        files={"file": ("nine.png", data, "image/png")},
        headers={"x-api-key": live_server.api_key, "X-Request-ID": "e2e-1"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "e2e-1"
    assert response.json()["prediccion"] == 9


def test_public_routes_over_http(live_server: LiveServer) -> None:
    assert requests.get(f"{live_server.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{live_server.url}/readyz", timeout=5).status_code == 200
    assert requests.get(f"{live_server.url}/", timeout=5).status_code == 200
    assert "paths" in requests.get(f"{live_server.url}/openapi.json", timeout=5).json()


def test_each_worker_loads_the_model_after_the_fork(live_server: LiveServer) -> None:
    deadline = time.monotonic() + 20  # /readyz answered once the first worker was ready
    pids: set[int] = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        pids = live_server.worker_pids()
        time.sleep(0.1)
    assert len(pids) == 2  # WEB_CONCURRENCY=2: one load per worker ...
    assert live_server.process.pid not in pids  # ... and none in the master


def test_body_over_the_limit_through_gunicorn(live_server: LiveServer) -> None:
    body = b"\0" * (10 * 1024 * 1024 + 1)
    response = requests.post(
        f"{live_server.url}/predict",
        data=body,
        headers={"x-api-key": live_server.api_key, "Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_request_log_lines_are_json(live_server: LiveServer) -> None:
    requests.get(f"{live_server.url}/healthz", headers={"X-Request-ID": "log-check"}, timeout=5)
    lines = [r for r in live_server.records() if r.get("request_id") == "log-check"]
    assert lines and lines[-1]["route"] == "/healthz" and lines[-1]["status"] == 200
    assert live_server.api_key not in live_server.log()


def test_a_busy_worker_leaves_connections_to_the_others(tmp_path: Path) -> None:
    # A gthread worker would otherwise accept every connection it sees, busy or not, and a
    # client's connections opened at once (wrk, a proxy's pool) could all stick to one worker.
    # Freeze one worker and open ten connections: the awake one takes only its four threads'
    # worth, the frozen one gets the next four when it wakes, and the last two go to whichever
    # frees a slot first (the awake one, which closes a connection after its answer while
    # others are waiting, and keeps the rest alive once nobody waits).
    server = start_web(tmp_path, WEB_CONCURRENCY="2", GUNICORN_THREADS="4")
    try:
        awake, frozen = sorted(server.worker_pids_when(2))
        address = urlsplit(server.url)
        ids = [f"cap-{uuid.uuid4().hex[:8]}-{n}" for n in range(10)]
        os.kill(frozen, signal.SIGSTOP)
        try:
            sockets = connect_at_once(address, len(ids))
            time.sleep(0.5)  # the awake worker accepts what it is allowed to
        finally:
            os.kill(frozen, signal.SIGCONT)
        time.sleep(0.5)  # and the other one, now awake, too
        connections = []
        for sock in sockets:
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
            connection.sock = sock
            connections.append(connection)
        kept: list[str] = []
        try:
            for connection, request_id in zip(connections, ids, strict=True):
                connection.request("GET", "/healthz", headers={"X-Request-ID": request_id})
                response = connection.getresponse()
                assert response.status == 200
                kept.append(response.headers["Connection"])
        finally:
            for connection in connections:
                connection.close()
        time.sleep(0.3)  # the log lines are written after the responses
        answered_by = Counter(r["pid"] for r in server.records() if r.get("request_id") in ids)
    finally:
        stop(server.process)
    assert answered_by == {awake: 6, frozen: 4}
    assert kept[:2] == ["close", "close"]  # two clients were waiting behind them
    assert kept[-1] == "keep-alive"  # nobody waits any more


def test_keep_alive_serves_a_client_on_one_connection(live_server: LiveServer) -> None:
    address = urlsplit(live_server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        for _ in range(5):
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            assert response.status == 200 and response.headers["Connection"] == "keep-alive"
        local_port = connection.sock.getsockname()[1]  # still the first connection
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        assert connection.sock.getsockname()[1] == local_port
    finally:
        connection.close()


def test_idle_connections_never_keep_a_new_client_waiting(tmp_path: Path) -> None:
    """Every slot of both workers held by an idle kept-alive connection: a new client is
    still answered at once (the idle ones are closed), not after the keep-alive timeout."""
    server = start_web(tmp_path, WEB_CONCURRENCY="2", GUNICORN_THREADS="2")
    address = urlsplit(server.url)
    idle = []
    try:
        server.worker_pids_when(2)
        for _ in range(8):  # more than the 4 slots: the last ones wait, then get in
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            idle.append(connection)
        started = time.monotonic()
        newcomer = requests.get(f"{server.url}/healthz", timeout=10)
        waited = time.monotonic() - started
        assert newcomer.status_code == 200
        assert waited < 1.0, waited  # the keep-alive timeout is 2 s
    finally:
        for connection in idle:
            connection.close()
        stop(server.process)


def connect_at_once(address: SplitResult, count: int) -> list[socket.socket]:
    """Open `count` TCP connections at the same moment (non-blocking), as a load tool does."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex((address.hostname or "127.0.0.1", address.port or 80))
            selector.register(sock, selectors.EVENT_WRITE)
        pending = set(sockets)
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                pending.discard(key.fileobj)  # type: ignore[arg-type]
                selector.unregister(key.fileobj)
    assert not pending, "connections did not complete"
    for sock in sockets:
        sock.setblocking(True)
        sock.settimeout(10)
    return sockets


def test_metrics_folder_keeps_what_is_not_ours(tmp_path: Path) -> None:
    """gunicorn.conf.py empties PROMETHEUS_MULTIPROC_DIR of old samples, nothing else."""
    folder = tmp_path / "shared-volume"
    (folder / "keep-me").mkdir(parents=True)
    (folder / "keep-me" / "data.txt").write_text("someone else's")
    (folder / "notes.txt").write_text("not a metrics file")
    stale = folder / "counter_99999.db"
    stale.write_bytes(b"a previous run's samples")
    server = start_web(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        assert not stale.exists()  # the previous run's samples are gone ...
        assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 200
    finally:
        stop(server.process)
    # ... and everything that was not a metrics file is still there, folder included
    assert (folder / "notes.txt").read_text() == "not a metrics file"
    assert (folder / "keep-me" / "data.txt").read_text() == "someone else's"
