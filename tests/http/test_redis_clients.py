"""One Redis client factory: one pool per process and role, TLS decided once, fork-safe."""

from __future__ import annotations

import multiprocessing
import subprocess
from collections import Counter
from pathlib import Path

import redis
from flask.testing import FlaskClient

from mnist_api import create_app, redis_clients
from mnist_api.config import Settings
from tests.samples import as_paper, encode, sample
from tools.redis_server import RedisServer
from tools.services import free_port

PNG = encode(as_paper(sample(3)))


def connection_names(server: RedisServer) -> Counter[str]:
    """How many connections the server has, per client name (ours are `mnist-<role>`)."""
    clients = server.client().client_list()
    return Counter(str(c["name"]) for c in clients if str(c["name"]).startswith("mnist-"))


def use_every_role(client: FlaskClient, auth: dict[str, str], nonce: bytes) -> None:
    """A prediction (cache, limiter), then an async job answered at once from the cache."""
    data = PNG + nonce
    headers = {**auth, "Content-Type": "image/png"}
    assert client.post("/predict", data=data, headers=headers).status_code == 200
    accepted = client.post("/predict_async", data=data, headers=headers)
    assert accepted.status_code == 202, accepted.get_json()
    status = client.get(accepted.get_json()["status_url"], headers=auth).get_json()
    assert status["state"] == "SUCCESS"  # written and read through the results pool


def test_one_pool_per_role_and_url(redis_server: RedisServer) -> None:
    url = redis_server.url
    jobs = redis_clients.pool(url, redis_clients.JOBS)
    assert redis_clients.pool(url, redis_clients.JOBS) is jobs
    assert redis_clients.pool(url, redis_clients.LIMITS) is not jobs
    first, second = (redis_clients.client(url, redis_clients.JOBS) for _ in range(2))
    assert first.connection_pool is second.connection_pool
    options = redis_clients.pool(url, redis_clients.LIMITS).connection_kwargs
    assert options["socket_timeout"] == 0.2 and options["socket_connect_timeout"] == 0.2


def test_apps_share_the_pools_of_their_process(
    settings: Settings, redis_server: RedisServer, auth: dict[str, str]
) -> None:
    """Cache, limiter, job store and Celery's results: one connection per role, two apps."""
    configured = settings.replace(redis_url=redis_server.url, rate_limit="100/minute")
    for nonce, app in enumerate([create_app(configured), create_app(configured)]):
        use_every_role(app.test_client(), auth, bytes([nonce]))
    names = connection_names(redis_server)
    # The deployment lives in the database; Redis only carries change notifications: each
    # app's listener holds its own pub/sub connection.
    assert names.pop("mnist-deployment-listen") == 2
    assert names == {
        "mnist-cache": 1,
        "mnist-limits": 1,
        "mnist-jobs": 1,
        "mnist-results": 1,
    }


def _child_pool(url: str, inherited_id: int, answers: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    pool = redis_clients.pool(url, redis_clients.JOBS)
    answers.put((id(pool) != inherited_id, redis.Redis(connection_pool=pool).ping()))


def test_a_forked_child_gets_its_own_pool(redis_server: RedisServer) -> None:
    parent = redis_clients.pool(redis_server.url, redis_clients.JOBS)
    assert redis.Redis(connection_pool=parent).ping()
    context = multiprocessing.get_context("fork")  # as gunicorn and Celery's prefork do
    answers = context.Queue()
    child = context.Process(target=_child_pool, args=(redis_server.url, id(parent), answers))
    child.start()
    fresh, pinged = answers.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert fresh and pinged
    # the parent's connection still works after the child used (and dropped) its own
    assert redis.Redis(connection_pool=parent).ping()


def test_every_role_over_tls_with_a_self_signed_certificate(
    tmp_path: Path, settings: Settings, auth: dict[str, str]
) -> None:
    """Heroku Redis: rediss:// with a self-signed certificate, for every part at once."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    server = RedisServer(free_port(), tmp_path, tls=(cert, key))
    server.start()
    try:
        assert server.url.startswith("rediss://")
        app = create_app(settings.replace(redis_url=server.url, rate_limit="100/minute"))
        client = app.test_client()
        use_every_role(client, auth, b"tls")
        queued = client.post(
            "/predict_async", data=PNG + b"queued", headers={**auth, "Content-Type": "image/png"}
        )
        assert queued.status_code == 202  # the broker (kombu) took the message over TLS
        ready = client.get("/readyz").get_json()
        assert (ready["cache"], ready["broker"]) == ("redis", "ok")
        assert set(connection_names(server)) == {
            "mnist-cache",
            "mnist-limits",
            "mnist-jobs",
            "mnist-results",
            "mnist-deployment-listen",
        }
    finally:
        server.kill()
