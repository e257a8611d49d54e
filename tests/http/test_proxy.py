"""The service behind a real nginx configured like Heroku's Router 2.0 (loopback, bounded).

The router speaks HTTP/1.1 to the dyno and keeps idle connections to it for 90 s, and never
retries a request it sent (a POST could have been acted on). So every connection the service
closes while the router may be about to use it is a client-visible error: the burst-and-gap
test counts them. nginx runs as our own process (not a daemon), its config, pid file and logs
in the test's folder, on a free port.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.samples import as_paper, encode, sample
from tools.load import Shot, run_load
from tools.services import LiveServer, free_port, start_web, stop

HIT = encode(as_paper(sample(7)))
MISS = encode(as_paper(sample(3)))
SHOTS = [
    Shot("hit", 200, lambda n: HIT, weight=4),
    Shot("miss", 200, lambda n: MISS + n.to_bytes(8, "big"), weight=4),
    Shot("invalid", 400, lambda n: b"not an image"),
]

# Heroku Router 2.0 as far as the dyno can tell: HTTP/1.1 with keep-alive to the dyno, idle
# connections kept 90 s, no retry on another connection (proxy_next_upstream off), 30 s to
# the first byte of the answer (H12), and requests streamed to the dyno as they arrive.
NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream dyno {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_timeout 90s;
        keepalive_requests 100000;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 20m;
        location / {{
            proxy_pass http://dyno;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_next_upstream off;
            proxy_request_buffering off;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx in front of one upstream."""

    url: str
    process: subprocess.Popen[bytes]
    folder: Path

    def error_log(self) -> str:
        """nginx's error log so far (what it saw go wrong with the upstream)."""
        path = self.folder / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_nginx(folder: Path, upstream_port: int) -> Nginx:
    """nginx (the Debian package) as our own foreground process, on a free port."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed: `make system-deps` installs it")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # As root, nginx would switch its worker to "nobody", which cannot write into our folder.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, folder=folder, upstream=upstream_port, port=port))
    process = subprocess.Popen(
        [binary, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "nginx.err").open("wb"),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((folder / "nginx.err").read_text())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.05)
    return Nginx(f"http://127.0.0.1:{port}", process, folder)


@pytest.fixture
def proxied(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LiveServer, Nginx]]:
    """The service as deployed (2 workers x 4 threads) with nginx in front; gunicorn's
    keep-alive is the test's parameter, else the default."""
    keepalive = getattr(request, "param", "2")
    server = start_web(tmp_path, WEB_CONCURRENCY="2", GUNICORN_KEEPALIVE=keepalive)
    nginx = start_nginx(tmp_path / "nginx", int(server.url.rsplit(":", 1)[1]))
    try:
        server.worker_pids_when(2)
        yield server, nginx
    finally:
        stop(nginx.process)
        stop(server.process)


# Shorter than the router's idle timeout (the default, for direct clients), and longer (what
# app.json sets on Heroku, following Heroku's advice: the router then always closes first).
@pytest.mark.parametrize(
    "proxied", ["2", "100"], ids=["keepalive-2s", "keepalive-100s"], indirect=True
)
def test_bursts_with_idle_gaps_through_the_router(proxied: tuple[LiveServer, Nginx]) -> None:
    server, nginx = proxied
    rng = random.Random(7)
    sent = 0
    errors: list[str] = []
    for burst in range(4):
        result = run_load(nginx.url, server.api_key, SHOTS, seconds=1.0, concurrency=32, seed=burst)
        sent += result.sent
        errors += result.unexpected
        failed = result.by_status.get(502, 0) + result.by_status.get(504, 0)
        assert not failed, f"burst {burst}: {result.by_status}\n{nginx.error_log()[-2000:]}"
        # Idle: the router keeps its connections; the service may close them meanwhile. The
        # worker closes an expired connection on its next loop turn (at most 1 s late, more
        # on a loaded machine), so with a 2 s keep-alive the close lands 2-3+ s into the
        # gap: a burst starting inside that window could meet a close in flight, a race
        # HTTP/1.1 keep-alive cannot rule out (hence app.json's 100 s, longer than the
        # router's 90 s). Gaps past it test what can be promised: a close the router saw
        # costs no request. (A CI run under load saw 2 x 502 with 2.5-3.5 s gaps.)
        time.sleep(rng.uniform(4.0, 5.0))
    print(f"through the router: {sent} requests in 4 bursts, errors {errors[:5]}")
    assert sent > 200
    assert errors == [], errors[:10]
    assert "upstream prematurely closed" not in nginx.error_log()


def test_stalled_clients_through_the_router(proxied: tuple[LiveServer, Nginx]) -> None:
    """nginx waits for a whole head itself, but streams a body as it comes: 64 bodies that
    stall reach the service, which still answers everyone else at once."""
    server, nginx = proxied
    port = int(nginx.url.rsplit(":", 1)[1])
    stalled = []
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"x-api-key: " + server.api_key.encode() + b"\r\nContent-Length: 900\r\n\r\n"
    )
    try:
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(head + HIT[:50])
            stalled.append(sock)
        time.sleep(0.5)
        for _ in range(3):
            started = time.monotonic()
            health = requests.get(f"{nginx.url}/healthz", timeout=5)
            predicted = requests.post(
                f"{nginx.url}/predict",
                data=HIT,
                headers={"x-api-key": server.api_key, "Content-Type": "image/png"},
                timeout=5,
            )
            took = time.monotonic() - started
            assert health.status_code == 200 and predicted.status_code == 200
            assert took < 1.0, took  # the liveness bound, not a benchmark
    finally:
        for sock in stalled:
            sock.close()
