"""The prediction cache against a real redis-server: hits, TTL, versions, outages, stalls."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from apiflask import APIFlask
from flask.testing import FlaskClient
from loguru import logger

from mnist_api import create_app
from mnist_api.config import PROJECT_ROOT, Settings
from mnist_api.extensions import CACHE, SERVICE
from mnist_api.inference.cache import CacheHooks, MemoryCache, RedisCache, build_cache
from mnist_api.inference.model import DigitModel
from tests.samples import as_paper, encode, sample
from tools.decode_memory import small_digit
from tools.redis_server import RedisServer
from tools.services import free_port, start_web, stop


def png_of(digit: int, nonce: int = 0) -> bytes:
    """A real PNG; `nonce` changes the bytes (and so the cache key) but not the picture."""
    return encode(as_paper(sample(digit))) + nonce.to_bytes(4, "big") * bool(nonce)


class Counter:
    """Counts calls to the model's predict (the interpreter runs once per call)."""

    def __init__(self, model: DigitModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        self.calls = 0
        original = model.predict

        def counting(images: np.ndarray) -> np.ndarray:
            self.calls += 1
            self.images += len(images)
            return original(images)

        monkeypatch.setattr(model, "predict", counting)


@pytest.fixture
def redis_app(settings: Settings, redis_server: RedisServer) -> APIFlask:
    """The app with its cache on the test's redis-server, a quick breaker retry."""
    return create_app(settings.replace(redis_url=redis_server.url, cache_retry_seconds=0.2))


@pytest.fixture
def redis_client(redis_app: APIFlask) -> FlaskClient:
    return redis_app.test_client()


@pytest.fixture
def counter(redis_app: APIFlask, monkeypatch: pytest.MonkeyPatch) -> Counter:
    return Counter(redis_app.extensions[SERVICE].model, monkeypatch)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Messages loguru writes during the test."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


def post(client: FlaskClient, data: bytes, auth: dict[str, str]):
    return client.post("/predict", data=data, headers={**auth, "Content-Type": "image/png"})


def test_same_bytes_twice_is_a_hit_without_the_model(
    redis_client: FlaskClient,
    redis_server: RedisServer,
    counter: Counter,
    auth: dict[str, str],
    redis_app: APIFlask,
) -> None:
    data = png_of(4)
    first = post(redis_client, data, auth)
    second = post(redis_client, data, auth)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert (first.get_json()["cached"], second.get_json()["cached"]) == (False, True)
    # Each answer carries its own prediction id (with the time it was given): compare the rest.
    assert {**first.get_json(), "cached": True, "prediction_id": ""} == {
        **second.get_json(),
        "prediction_id": "",
    }
    assert counter.calls == 1  # the hit never reached the interpreter

    key = redis_app.extensions["mnist_service"].key_for(data)
    assert key.startswith(f"pred:{redis_app.extensions[SERVICE].model.full_version}+p")
    assert 0 < redis_server.client().ttl(key) <= 3600


def test_cache_backend_is_reported(redis_client: FlaskClient, auth: dict[str, str]) -> None:
    assert redis_client.get("/readyz").get_json()["cache"] == "redis"
    assert redis_client.get("/model", headers=auth).get_json()["cache"] == "redis"


def test_a_new_model_version_misses(
    redis_client: FlaskClient,
    redis_app: APIFlask,
    counter: Counter,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = png_of(2)
    post(redis_client, data, auth)
    monkeypatch.setattr(redis_app.extensions[SERVICE].model, "sha256", "f" * 64)
    again = post(redis_client, data, auth)
    assert again.headers["X-Cache"] == "MISS"
    assert again.get_json()["model_version"] == "mnist-cnn-int8-ffffffffffff"
    assert counter.calls == 2


def test_batch_uses_one_mget_and_one_pipeline(
    redis_client: FlaskClient, redis_server: RedisServer, counter: Counter, auth: dict[str, str]
) -> None:
    server = redis_server.client()
    known = png_of(1)
    post(redis_client, known, auth)
    server.config_resetstat()
    uploads = [known, png_of(5), png_of(6), png_of(5)]  # one hit, two new, one repeat
    files = {"files": [(io.BytesIO(d), f"{i}.png") for i, d in enumerate(uploads)]}
    body = redis_client.post("/predict/batch", data=files, headers=auth).get_json()
    assert [item["cached"] for item in body["predictions"]] == [True, False, False, False]
    stats = server.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats
    assert stats["cmdstat_set"]["calls"] == 2  # the repeated upload was computed once
    assert counter.images == 1 + 2


def test_redis_killed_then_restarted(
    redis_client: FlaskClient,
    redis_server: RedisServer,
    counter: Counter,
    auth: dict[str, str],
    log_lines: list[str],
) -> None:
    data = png_of(3)
    assert post(redis_client, data, auth).headers["X-Cache"] == "MISS"
    redis_server.kill()

    for _ in range(5):
        response = post(redis_client, data, auth)
        assert response.status_code == 200
        assert response.headers["X-Cache"] == "MISS"
        assert response.get_json()["cached"] is False
    ready = redis_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["cache"] == "degraded"
    assert sum("cache degraded" in line for line in log_lines) == 1  # once per incident

    redis_server.start()  # same port, empty memory; the app is not restarted
    time.sleep(0.3)  # past the breaker's retry interval
    assert post(redis_client, data, auth).headers["X-Cache"] == "MISS"  # refills
    assert post(redis_client, data, auth).headers["X-Cache"] == "HIT"
    assert redis_client.get("/readyz").get_json()["cache"] == "redis"
    assert any("cache recovered" in line for line in log_lines)


def test_stalled_redis_does_not_stall_requests(
    redis_client: FlaskClient, redis_server: RedisServer, auth: dict[str, str]
) -> None:
    post(redis_client, png_of(8), auth)  # connections are open and warm
    slept: list[float] = []

    def stall() -> None:
        started = time.monotonic()
        redis_server.client().execute_command("DEBUG", "SLEEP", "2")
        slept.append(time.monotonic() - started)

    staller = threading.Thread(target=stall)
    staller.start()
    time.sleep(0.1)  # the server is now asleep
    try:
        started = time.monotonic()
        response = post(redis_client, png_of(8, nonce=1), auth)
        elapsed = time.monotonic() - started
    finally:
        staller.join()
    assert slept and slept[0] >= 1.5  # Redis really was stalled during the request
    assert response.status_code == 200
    assert response.headers["X-Cache"] == "MISS"
    assert elapsed < 0.5


def test_rediss_with_a_self_signed_certificate(
    tmp_path: Path, settings: Settings, auth: dict[str, str]
) -> None:
    """Heroku Redis speaks TLS with a self-signed certificate: rediss:// must still work."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = RedisServer(free_port(), tmp_path, tls=(cert, key))
    server.start()
    try:
        app = create_app(settings.replace(redis_url=server.url))
        cache = app.extensions[CACHE]
        assert isinstance(cache, RedisCache)
        client = app.test_client()
        data = png_of(9)
        assert post(client, data, auth).headers["X-Cache"] == "MISS"
        assert post(client, data, auth).headers["X-Cache"] == "HIT"
        assert client.get("/readyz").get_json()["cache"] == "redis"
    finally:
        server.kill()


def test_unreachable_redis_at_startup_is_not_fatal(
    settings: Settings, auth: dict[str, str]
) -> None:
    app = create_app(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    response = post(app.test_client(), png_of(0), auth)
    assert response.status_code == 200
    assert app.test_client().get("/readyz").get_json()["cache"] == "degraded"


def test_memory_backend_without_redis_url(settings: Settings) -> None:
    assert isinstance(build_cache(settings), MemoryCache)
    assert isinstance(build_cache(settings.replace(redis_url="redis://x:1/0")), RedisCache)


def test_memory_cache_is_bounded_lru() -> None:
    cache = MemoryCache(max_items=3, ttl_seconds=60)
    cache.set_many({"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 3}})
    cache.get_many(["a"])  # a is now the most recently used
    cache.set_many({"d": {"v": 4}})
    assert len(cache) == 3
    assert cache.get_many(["a", "b", "c", "d"]) == [{"v": 1}, None, {"v": 3}, {"v": 4}]


def test_memory_cache_expires() -> None:
    now = [100.0]
    cache = MemoryCache(max_items=10, ttl_seconds=5, clock=lambda: now[0])
    cache.set_many({"k": {"v": 1}})
    now[0] = 104.0
    assert cache.get_many(["k"]) == [{"v": 1}]
    now[0] = 105.5
    assert cache.get_many(["k"]) == [None]


def test_lookups_and_outages_are_reported() -> None:
    lookups: dict[str, int] = {}
    states: list[bool] = []
    hooks = CacheHooks(
        lookups=lambda r, n: lookups.__setitem__(r, lookups.get(r, 0) + n),
        degraded=states.append,
    )
    url = f"redis://127.0.0.1:{free_port()}/0"
    cache = RedisCache.from_url(url, 60, retry_seconds=0.0, hooks=hooks)
    assert cache.get_many(["a", "b"]) == [None, None]
    cache.set_many({"a": {"v": 1}})
    assert lookups == {"error": 2}
    assert states == [True]  # reported once per outage
    with pytest.raises(redis.RedisError):
        cache.client.ping()

    memory = MemoryCache(10, 60, hooks=hooks)
    memory.set_many({"a": {"v": 1}})
    memory.get_many(["a", "b", "c"])
    assert lookups == {"error": 2, "hit": 1, "miss": 2}


def project_copy(tmp_path: Path) -> Path:
    """A copy of the service's code (models, page and tools shared by links) to change."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("mnist_api", "tools"):
        shutil.copytree(
            PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("api.py", "gunicorn.conf.py", "Procfile", "make_celery.py"):
        shutil.copy2(PROJECT_ROOT / name, root / name)
    for name in ("models", "templates", "static"):
        (root / name).symlink_to(PROJECT_ROOT / name)
    return root


def test_the_cache_key_covers_decoding_and_the_decode_budget(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Issue 22: after a change to decoding.py or to a DECODE_MEMORY_BUDGET_MB that changes
    the decode scale, gunicorn on the same Redis served the old answers (X-Cache: HIT)."""
    # A 160 px digit in a 12 MP JPEG: the budget decides how fine its second decode is
    # (24 MiB: 1/4 scale, 64 MiB: 1/2), so the two settings give different pixels.
    data = small_digit("JPEG")

    def cache_of(root: Path, budget_mb: int) -> list[str]:
        server = start_web(
            tmp_path,
            root=root,
            REDIS_URL=redis_server.url,
            WEB_CONCURRENCY="1",
            DECODE_MEMORY_BUDGET_MB=str(budget_mb),
        )
        try:
            answers = [
                requests.post(
                    f"{server.url}/predict",
                    data=data,
                    headers={"x-api-key": server.api_key, "Content-Type": "image/jpeg"},
                    timeout=30,
                )
                for _ in range(2)
            ]
        finally:
            stop(server.process)
        assert [answer.status_code for answer in answers] == [200, 200]
        return [answer.headers["X-Cache"] for answer in answers]

    assert cache_of(PROJECT_ROOT, 24) == ["MISS", "HIT"]
    assert cache_of(PROJECT_ROOT, 24) == ["HIT", "HIT"]  # a restart alone keeps the answers
    assert cache_of(PROJECT_ROOT, 64) == ["MISS", "HIT"]  # another decode scale: recomputed
    changed = project_copy(tmp_path)
    decoding = changed / "mnist_api" / "imaging" / "decoding.py"
    decoding.write_text(decoding.read_text() + "\n# a deploy that changed the decoder\n")
    assert cache_of(changed, 64) == ["MISS", "HIT"]  # other decoding code: recomputed
