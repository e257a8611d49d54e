"""Per-key rate limits: shared across gunicorn workers through Redis, 429s with headers."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from flask.testing import FlaskClient

from mnist_api.app import create_app
from mnist_api.config import ConfigError, Settings
from mnist_api.http import rate_limits
from mnist_api.http.rate_limits import KEY_PREFIX, RateLimiter, RedisCounter
from mnist_api.rate_windows import Window, parse_windows
from tests.http.test_errors import assert_contract_error
from tests.samples import as_paper, encode, sample
from tools.redis_server import RedisServer
from tools.services import API_KEYS, free_port, start_web, stop

PNG = encode(as_paper(sample(5)))


@pytest.fixture
def limited(settings: Settings) -> FlaskClient:
    return create_app(settings.replace(rate_limit="3/minute")).test_client()


def predict(client: FlaskClient, key: str, **headers: str):
    return client.post(
        "/predict", data=PNG, headers={"x-api-key": key, "Content-Type": "image/png", **headers}
    )


def test_limit_per_key_with_headers(limited: FlaskClient) -> None:
    answers = [predict(limited, API_KEYS[0]) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].headers["X-RateLimit-Limit"] == "3"
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["2", "1", "0"]
    refused = predict(limited, API_KEYS[0])
    assert_contract_error(refused, 429, "rate_limited")
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert "X-RateLimit-Reset" in refused.headers
    # another key has its own budget
    assert predict(limited, API_KEYS[1]).status_code == 200


def test_unknown_keys_are_counted_by_ip(limited: FlaskClient) -> None:
    statuses = [predict(limited, f"made-up-{i}").status_code for i in range(4)]
    assert statuses == [401, 401, 401, 429]
    # by default X-Forwarded-For is not trusted: a made-up one is still the same client
    spoofed = predict(limited, "made-up", **{"X-Forwarded-For": "203.0.113.9"})
    assert spoofed.status_code == 429


def test_behind_a_trusted_proxy_each_client_is_its_own_ip(settings: Settings) -> None:
    # PROXY_FIX_X_FOR=1 (app.json, Heroku): the router appends the client's address
    client = create_app(settings.replace(rate_limit="3/minute", proxy_fix_x_for=1)).test_client()
    first = {"X-Forwarded-For": "198.51.100.7"}
    assert [predict(client, "made-up", **first).status_code for _ in range(4)][-1] == 429
    other = predict(client, "made-up", **{"X-Forwarded-For": "203.0.113.9"})
    assert other.status_code == 401


def test_spoofed_forwarded_for_does_not_reset_the_ip_limit(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Real gunicorn with the default PROXY_FIX_X_FOR: a new X-Forwarded-For per request."""
    server = start_web(
        tmp_path, REDIS_URL=redis_server.url, RATE_LIMIT="3/minute", WEB_CONCURRENCY="2"
    )
    try:
        statuses = [
            requests.post(
                f"{server.url}/predict",
                data=PNG,
                timeout=10,
                headers={
                    "x-api-key": f"made-up-{n}",
                    "Content-Type": "image/png",
                    "X-Forwarded-For": f"203.0.113.{n}",
                },
            ).status_code
            for n in range(8)
        ]
        # a valid key is still counted on its own budget
        keyed = requests.post(
            f"{server.url}/predict",
            data=PNG,
            timeout=10,
            headers={"x-api-key": server.api_key, "Content-Type": "image/png"},
        )
    finally:
        stop(server.process)
    assert statuses == [401, 401, 401] + [429] * 5, statuses
    assert keyed.status_code == 200


def test_public_routes_are_not_limited(limited: FlaskClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        assert all(limited.get(path).status_code == 200 for _ in range(6)), path


def test_rate_limit_setting() -> None:
    assert Settings.from_env({}).rate_limit == "120/minute"
    assert Settings.from_env({}).proxy_fix_x_for == 0  # X-Forwarded-For trusted only if told
    assert Settings.from_env({"RATE_LIMIT": "off"}).rate_limit == ""
    assert Settings.from_env({"RATE_LIMIT": "10/second;500/hour"}).rate_limit
    with pytest.raises(ConfigError, match="RATE_LIMIT"):
        Settings.from_env({"RATE_LIMIT": "lots"})


def test_limiter_redis_down_fails_open(settings: Settings) -> None:
    client = create_app(
        settings.replace(rate_limit="2/minute", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    ).test_client()
    statuses = [predict(client, API_KEYS[0]).status_code for _ in range(4)]
    assert all(status < 500 for status in statuses)
    assert statuses[0] == 200


def test_two_workers_share_one_count(redis_server: RedisServer, tmp_path: Path) -> None:
    server = start_web(
        tmp_path,
        REDIS_URL=redis_server.url,
        RATE_LIMIT="20/minute",
        WEB_CONCURRENCY="2",
        GUNICORN_THREADS="1",
    )
    try:

        def post(_: int) -> int:
            return requests.post(
                f"{server.url}/predict",
                data=PNG,
                timeout=10,
                headers={
                    "x-api-key": server.api_key,
                    "Content-Type": "image/png",
                    "Connection": "close",
                },
            ).status_code

        # All at once: with one thread per worker, a busy worker leaves the next to the other.
        statuses: list[int] = []
        served_by: set[int] = set()
        for _ in range(10):  # rounds until both workers have answered (the kernel picks)
            with ThreadPoolExecutor(max_workers=16) as pool:
                statuses += pool.map(post, range(40))
            served_by = {r["pid"] for r in server.records() if r.get("route") == "/predict"}
            if len(served_by) == 2:
                break
        assert len(served_by) == 2  # both workers answered ...
        assert statuses.count(200) == 20, statuses  # ... and still one budget between them
        assert statuses.count(429) == len(statuses) - 20
        redis_server.kill()  # the limiter's store goes away: requests are still served
        after = requests.post(
            f"{server.url}/predict",
            data=PNG,
            timeout=10,
            headers={"x-api-key": API_KEYS[1], "Content-Type": "image/png"},
        )
        assert after.status_code == 200
    finally:
        stop(server.process)


def test_a_busy_servers_retry_after_survives_the_limiter_headers(settings: Settings) -> None:
    """A 503 server_busy keeps its own Retry-After (seconds): the limiter's window reset is
    only ever sent with its own 429."""
    app = create_app(settings.replace(rate_limit="100/minute", decode_wait_seconds=0.2))
    budget = app.extensions["mnist_service"].limits.budget
    client = app.test_client()
    with budget.reserve(budget.capacity):  # every byte of this worker's budget is taken
        busy = predict(client, API_KEYS[0])
    assert_contract_error(busy, 503, "server_busy")
    assert busy.headers["Retry-After"] == budget.retry_after() == "1"
    assert busy.headers["X-RateLimit-Limit"] == "100"
    served = predict(client, API_KEYS[0])
    assert served.status_code == 200  # and the budget is free again
    assert "Retry-After" not in served.headers  # nothing to wait for on a served request


def test_each_route_has_its_own_count_per_key(limited: FlaskClient) -> None:
    assert [predict(limited, API_KEYS[0]).status_code for _ in range(4)][-1] == 429
    models = limited.get("/models", headers={"x-api-key": API_KEYS[0]})
    assert models.status_code == 200
    assert models.headers["X-RateLimit-Remaining"] == "2"


def test_the_tightest_of_several_windows_is_reported(settings: Settings) -> None:
    client = create_app(settings.replace(rate_limit="2/second;5/minute")).test_client()
    first = predict(client, API_KEYS[0])
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == (
        "2",
        "1",
    )
    assert "Retry-After" not in first.headers
    assert predict(client, API_KEYS[0]).status_code == 200
    refused = predict(client, API_KEYS[0])  # the third within a second
    assert_contract_error(refused, 429, "rate_limited")
    assert refused.headers["Retry-After"] == "1"


def test_rate_limit_grammar() -> None:
    assert parse_windows("120/minute") == (Window(120, 60),)
    assert parse_windows("10 per second; 1000/2 hours") == (Window(10, 1), Window(1000, 7200))
    for bad in ("lots", "0/minute", "5/fortnight", ""):
        with pytest.raises(ValueError):
            parse_windows(bad)


def test_redis_counts_windows_in_one_script(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    counter = RedisCounter(client)
    windows = (Window(3, 60), Window(10, 3600))
    first = counter.hit("key:abc:api.predict", windows)
    assert [(c.count, c.remaining) for c in first] == [(1, 2), (1, 9)]
    assert 59 <= first[0].reset_in <= 60 and 3599 <= first[1].reset_in <= 3600
    # a counter that somehow lost its TTL gets its window back instead of never resetting
    client.persist(f"{KEY_PREFIX}:key:abc:api.predict:3/60s")
    again = counter.hit("key:abc:api.predict", windows)
    assert again[0].count == 2 and again[0].reset_in == 60
    assert client.ttl(f"{KEY_PREFIX}:key:abc:api.predict:3/60s") > 0


def test_a_redis_outage_counts_in_memory_then_goes_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.2)
    limiter = RateLimiter((Window(5, 60),), RedisCounter(client))
    assert limiter.hit("key:k")[0].count == 1
    monkeypatch.setattr(rate_limits, "RETRY_SECONDS", 0.0)
    limiter = RateLimiter((Window(5, 60),), RedisCounter(client))
    redis_server.kill()
    assert [limiter.hit("key:k")[0].count for _ in range(2)] == [1, 2]  # this process's
    redis_server.start()
    assert limiter.hit("key:k")[0].count == 1  # a new Redis, fresh counts, Redis again


@pytest.fixture
def limited_on_redis(settings: Settings, redis_server: RedisServer) -> FlaskClient:
    return create_app(
        settings.replace(rate_limit="3/minute", redis_url=redis_server.url)
    ).test_client()


def test_predict_counts_in_the_cache_lookups_round_trip(
    limited_on_redis: FlaskClient, redis_server: RedisServer
) -> None:
    """A keyed /predict sends its count in the cache lookup's pipeline: the limiter's own
    connection is never opened, and the limit and its headers are what they always were.
    (With the script already in Redis: on a fresh Redis the first count loads it alone.)"""
    redis.Redis.from_url(redis_server.url).script_load(rate_limits._HIT_SCRIPT)
    answers = [predict(limited_on_redis, API_KEYS[0]) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["2", "1", "0"]
    assert [a.headers["X-Cache"] for a in answers] == ["MISS", "HIT", "HIT"]
    refused = predict(limited_on_redis, API_KEYS[0])
    assert_contract_error(refused, 429, "rate_limited")
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    clients = redis.Redis.from_url(redis_server.url).client_list()
    names = {client["name"] for client in clients}
    assert "mnist-cache" in names and "mnist-limits" not in names


def test_over_the_limit_is_refused_before_the_upload_is_decoded(
    limited_on_redis: FlaskClient,
) -> None:
    for _ in range(3):
        predict(limited_on_redis, API_KEYS[0])
    broken = limited_on_redis.post(
        "/predict",
        data=b"\x89PNG\r\n\x1a\n not really",
        headers={"x-api-key": API_KEYS[0], "Content-Type": "image/png"},
    )
    assert_contract_error(broken, 429, "rate_limited")


def test_a_request_that_ends_before_its_lookup_still_counts(
    limited_on_redis: FlaskClient,
) -> None:
    empty = limited_on_redis.post(
        "/predict", headers={"x-api-key": API_KEYS[0], "Content-Type": "image/png"}
    )
    assert_contract_error(empty, 400, "missing_file")
    assert empty.headers["X-RateLimit-Remaining"] == "2"
    assert [predict(limited_on_redis, API_KEYS[0]).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]


def test_a_flushed_script_is_loaded_again(
    limited_on_redis: FlaskClient, redis_server: RedisServer
) -> None:
    assert predict(limited_on_redis, API_KEYS[0]).headers["X-RateLimit-Remaining"] == "2"
    redis.Redis.from_url(redis_server.url).script_flush()  # as after a Redis restart
    again = predict(limited_on_redis, API_KEYS[0])
    assert again.status_code == 200 and again.headers["X-RateLimit-Remaining"] == "1"
    assert predict(limited_on_redis, API_KEYS[0]).headers["X-RateLimit-Remaining"] == "0"


def test_a_batch_counts_once_in_its_lookup(limited_on_redis: FlaskClient) -> None:
    files = [(io.BytesIO(PNG), "a.png"), (io.BytesIO(PNG), "b.png")]
    batch = limited_on_redis.post(
        "/predict/batch",
        data={"files": files},
        headers={"x-api-key": API_KEYS[0]},
        content_type="multipart/form-data",
    )
    assert batch.status_code == 200
    assert batch.headers["X-RateLimit-Remaining"] == "2"
