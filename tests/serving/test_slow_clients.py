"""Slow clients against the real gunicorn command (loopback, bounded, self-stopping).

A gthread worker hands a readable connection to a thread, which then blocks reading the rest
of the request: 8 sockets that sent half a request used to take every thread of two workers.
The worker in mnist_api/serving/gunicorn_worker.py reads each request in its event loop first.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from mnist_api.config import PROJECT_ROOT
from tests.samples import as_paper, encode, sample
from tools.load import Shot, run_load
from tools.redis_server import RedisServer
from tools.services import API_KEYS, LiveServer, start_web, stop

PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
NINE = encode(as_paper(sample(9)))
# A chunked body (no Content-Length): its first chunk, then nothing. With a key, so that
# the app reads the body (its thread waits for it).
CHUNKED_STALL = (
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    + f"x-api-key: {API_KEYS[0]}\r\n".encode()
    + b"Transfer-Encoding: chunked\r\n\r\n64\r\n"
    + NINE[:50]
)
BURST = [
    Shot("hit", 200, lambda n: NINE),
    Shot("miss", 200, lambda n: NINE + n.to_bytes(8, "big")),
]


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The service as deployed (2 workers x 4 threads), with short read limits to observe."""
    server = start_web(
        tmp_path_factory.mktemp("slow"),
        WEB_CONCURRENCY="2",
        GUNICORN_THREADS="4",
        REQUEST_HEADER_TIMEOUT="2",
        REQUEST_BODY_TIMEOUT="3",
    )
    try:
        server.worker_pids_when(2)
        yield server
    finally:
        stop(server.process)


def open_stalled(server: LiveServer, count: int, payload: bytes) -> list[socket.socket]:
    """`count` connections that each send `payload` (part of a request) and then nothing."""
    address = urlsplit(server.url)
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((address.hostname, address.port), timeout=10)
        sock.sendall(payload)
        sockets.append(sock)
    return sockets


def answered_within(server: LiveServer, seconds: float) -> list[float]:
    """Time a /healthz and a /predict from a new client; both must be 200."""
    timings = []
    started = time.monotonic()
    health = requests.get(f"{server.url}/healthz", timeout=seconds)
    timings.append(time.monotonic() - started)
    assert health.status_code == 200
    started = time.monotonic()
    predicted = requests.post(
        f"{server.url}/predict",
        data=NINE,
        headers={"x-api-key": server.api_key, "Content-Type": "image/png"},
        timeout=seconds,
    )
    timings.append(time.monotonic() - started)
    assert predicted.status_code == 200 and predicted.json()["prediccion"] == 9
    return timings


@pytest.mark.parametrize(
    "payload",
    [
        PARTIAL_HEAD,  # the head never ends
        # a complete head whose body never comes (small, and over the buffered size)
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 900\r\n\r\n" + NINE[:100],
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 5000000\r\n\r\n" + b"\0" * 100_000,
        CHUNKED_STALL,
    ],
    ids=["head", "small-body", "large-body", "chunked-body"],
)
def test_stalled_connections_do_not_take_the_service(
    strict_server: LiveServer, payload: bytes
) -> None:
    stalled = open_stalled(strict_server, 64, payload)
    try:
        time.sleep(0.5)  # they have sent what they will send
        # A functional liveness bound (the 1 s), not a benchmark: on the old worker
        # these requests waited for as long as the stalled sockets stayed open.
        for _ in range(3):
            timings = answered_within(strict_server, 5.0)
            assert max(timings) < 1.0, timings
    finally:
        for sock in stalled:
            sock.close()


def read_answer(sock: socket.socket) -> bytes:
    """Whatever the server sends until it closes the connection (b"" if it just closes)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize(
    ("payload", "limit"),
    [
        (PARTIAL_HEAD, 2.0),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 900\r\n\r\n" + NINE[:100],
            3.0,
        ),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5000000\r\n\r\n" + b"\0" * 100_000,
            3.0,
        ),
        (CHUNKED_STALL, 3.0),
    ],
    ids=["head", "small-body", "large-body", "chunked-body"],
)
def test_a_client_slower_than_the_limit_gets_408(
    strict_server: LiveServer, payload: bytes, limit: float
) -> None:
    (sock,) = open_stalled(strict_server, 1, payload)
    try:
        sock.settimeout(limit + 5)
        started = time.monotonic()
        answer = read_answer(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"code": "request_timeout"' in answer or b'"code":"request_timeout"' in answer
    assert limit - 0.5 <= waited <= limit + 2.0, waited


def test_a_head_over_the_limit_gets_431(strict_server: LiveServer) -> None:
    (sock,) = open_stalled(
        strict_server, 1, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    )
    try:
        sock.settimeout(5)
        answer = read_answer(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request_header_too_large" in answer


def test_a_trickling_client_is_cut_off_at_the_limit(strict_server: LiveServer) -> None:
    """One byte every 0.3 s: the limit is on the whole head, not on each read."""
    address = urlsplit(strict_server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    started = time.monotonic()
    try:
        for byte in PARTIAL_HEAD * 4:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server
                break
            time.sleep(0.3)
            if time.monotonic() - started > 6:
                break
        sock.settimeout(5)
        answer = read_answer(sock)
    except OSError:
        answer = b""
    finally:
        sock.close()
    assert time.monotonic() - started < 5.0
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


def test_a_silent_connection_is_closed_without_an_answer(strict_server: LiveServer) -> None:
    (sock,) = open_stalled(strict_server, 1, b"")
    try:
        sock.settimeout(8)
        started = time.monotonic()
        answer = read_answer(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert answer == b""  # nothing was asked, so nothing is answered
    assert waited < 4.0, waited


def test_a_request_sent_in_pieces_in_time_is_served(strict_server: LiveServer) -> None:
    address = urlsplit(strict_server.url)
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        + f"x-api-key: {strict_server.api_key}\r\nContent-Length: {len(NINE)}\r\n\r\n".encode()
    )
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        for piece in (head[:20], head[20:], NINE[:50], NINE[50:]):
            sock.sendall(piece)
            time.sleep(0.2)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b'"prediccion":9' in answer.replace(b" ", b"")


def compose_web_environment(redis_url: str) -> dict[str, str]:
    """docker-compose.yml's environment for `web`, with its Redis reachable from here."""
    document = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    web = document["services"]["web"]
    assert web["command"] == "gunicorn api:app -c gunicorn.conf.py"  # the Procfile's web line
    environment = {name: str(value) for name, value in web["environment"].items()}
    environment["API_KEY"] = API_KEYS[0]  # ${API_KEY:?set API_KEY}
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    environment["REDIS_URL"] = redis_url
    return environment


# How each documented command serves: `make run` (one worker, text logs, a dev admin key),
# `docker run` (the image's ENV), `docker compose up` (its environment, with Redis). The same
# gunicorn command in each; the read limits are the defaults.
SERVING_PATHS = {
    "make-run": {"WEB_CONCURRENCY": "1", "LOG_FORMAT": "text", "ADMIN_API_KEYS": "dev-admin"},
    "docker-run": {"PROXY_FIX_X_FOR": "0"},
    "compose": {},
}


@pytest.mark.parametrize("path", list(SERVING_PATHS))
def test_stalled_clients_with_default_limits(
    tmp_path: Path, redis_server: RedisServer, path: str
) -> None:
    environment = dict(SERVING_PATHS[path])
    if path == "compose":
        environment = compose_web_environment(redis_server.url)
    server = start_web(tmp_path, **environment)
    stalled: list[socket.socket] = []
    try:
        stalled = open_stalled(server, 64, PARTIAL_HEAD)
        time.sleep(0.5)
        timings = answered_within(server, 5.0)
        assert max(timings) < 1.0, timings
        if path == "compose":
            # and bursts with idle gaps longer than the keep-alive: not one error
            rng = random.Random(5)
            for burst in range(2):
                result = run_load(
                    server.url, server.api_key, BURST, seconds=1.0, concurrency=32, seed=burst
                )
                assert result.failures == 0 and result.sent > 50, result.unexpected[:5]
                time.sleep(rng.uniform(2.5, 3.5))
    finally:
        for sock in stalled:
            sock.close()
        stop(server.process)


def test_partial_requests_past_the_cap_push_out_the_oldest(tmp_path: Path) -> None:
    """One worker holds at most 128 partial requests: the 129th pushes out the oldest
    (408), and the service still answers."""
    server = start_web(tmp_path, WEB_CONCURRENCY="1", GUNICORN_THREADS="2")
    stalled: list[socket.socket] = []
    try:
        stalled = open_stalled(server, 140, PARTIAL_HEAD)
        stalled[0].settimeout(5)
        assert read_answer(stalled[0]).startswith(b"HTTP/1.1 408 ")
        timings = answered_within(server, 5.0)
        assert max(timings) < 1.0, timings
    finally:
        for sock in stalled:
            sock.close()
        stop(server.process)


def test_a_chunked_upload_is_served(strict_server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield NINE[:100]
        yield NINE[100:]

    response = requests.post(
        f"{strict_server.url}/predict",
        data=chunks(),  # no length: requests sends it chunked
        headers={"x-api-key": strict_server.api_key, "Content-Type": "image/png"},
        timeout=10,
    )
    assert response.status_code == 200 and response.json()["prediccion"] == 9
