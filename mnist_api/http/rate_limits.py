"""Per-key rate limits on the keyed API: fixed windows shared by every worker and dyno.

Counts live in Redis when `REDIS_URL` is set (one count across workers and dynos), else in
memory. A request with a valid key is counted against that key; anything else (no key, a
wrong key) against the client's IP, so rotating made-up keys does not escape the limit.
That IP is the TCP peer unless `PROXY_FIX_X_FOR` trusts proxies (Heroku's router). Each
route has its own count per key. Public routes (/healthz, /readyz, /metrics, the page) are
not limited.

One request costs one Redis round trip: a script increments every window's counter and
returns the counts with their time to reset, which is all the `X-RateLimit-*` headers need.
(Flask-Limiter, used before, made three: the increment, then a GET and a TTL for the
headers; a quarter of a cached answer's time.) If Redis fails, requests are still served
(fail open, logged once) and counted in this process until Redis answers again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis
from apiflask import APIBlueprint
from flask import Flask, Response, g, request
from loguru import logger
from werkzeug.middleware.proxy_fix import ProxyFix

from mnist_api import redis_clients
from mnist_api.breaker import Breaker
from mnist_api.config import Settings
from mnist_api.errors import RateLimited
from mnist_api.http.auth import API_KEY_HEADER, valid_key_fingerprint
from mnist_api.rate_windows import Window, parse_windows

KEY_PREFIX = "mnist-rl"
_WITH_LOOKUP = "_rate_limit_with_lookup"
View = TypeVar("View", bound=Callable[..., Any])
# Seconds a failed Redis is left alone before the limiter tries it again.
RETRY_SECONDS = 1.0

# Counts one request in every window of one identity; returns count, seconds to reset, ...
# A counter without a TTL (never expected, but it would never reset) gets its window again.
_HIT_SCRIPT = """
local result = {}
for i, key in ipairs(KEYS) do
  local seconds = tonumber(ARGV[i])
  local count = redis.call('INCR', key)
  local ttl = redis.call('TTL', key)
  if count == 1 or ttl < 0 then
    redis.call('EXPIRE', key, seconds)
    ttl = seconds
  end
  result[2 * i - 1] = count
  result[2 * i] = ttl
end
return result
"""


@dataclass(frozen=True)
class Count:
    """One window's count after this request, and the seconds until the window resets."""

    window: Window
    count: int
    reset_in: float

    @property
    def remaining(self) -> int:
        """Requests left in this window (0 when over)."""
        return max(0, self.window.amount - self.count)


class Counter(Protocol):
    """Counts a request in several windows at once."""

    def hit(self, key: str, windows: Sequence[Window]) -> list[Count]:
        """Add one to every window of `key`; the counts after it, in order."""


class MemoryCounter:
    """This process's fixed windows (no Redis, and Redis outages)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (resets at, count)

    def hit(self, key: str, windows: Sequence[Window]) -> list[Count]:
        """Count in memory; a window starts at its first request, as in Redis."""
        now = time.monotonic()
        counts = []
        with self._lock:
            if len(self._windows) > self.max_keys:  # only expired windows can be dropped
                self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
            for window in windows:
                name = f"{key}:{window.name}"
                resets_at, count = self._windows.get(name, (0.0, 0))
                if resets_at <= now:
                    resets_at, count = now + window.seconds, 0
                self._windows[name] = (resets_at, count + 1)
                counts.append(Count(window, count + 1, resets_at - now))
        return counts


class RedisCounter:
    """Windows in Redis, shared by every process: one script call per request."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_HIT_SCRIPT)

    def hit(self, key: str, windows: Sequence[Window]) -> list[Count]:
        """INCR (and EXPIRE on the first) every window's counter in one round trip."""
        keys = [f"{KEY_PREFIX}:{key}:{window.name}" for window in windows]
        return self.parse(self._script(keys=keys, args=[w.seconds for w in windows]), windows)

    def queue(self, pipe: redis.client.Pipeline, key: str, windows: Sequence[Window]) -> None:
        """Put the same script call into someone else's pipeline (by its SHA: a pipeline's
        own script loading would cost a SCRIPT EXISTS round trip on every execute)."""
        keys = [f"{KEY_PREFIX}:{key}:{window.name}" for window in windows]
        pipe.evalsha(self._script.sha, len(keys), *keys, *[w.seconds for w in windows])

    @staticmethod
    def parse(raw: Sequence[Any], windows: Sequence[Window]) -> list[Count]:
        """The script's reply as counts."""
        return [
            Count(window, int(raw[2 * i]), float(raw[2 * i + 1]))
            for i, window in enumerate(windows)
        ]


class RateLimiter:
    """Counts requests per identity and route, in Redis if given, falling back to memory."""

    def __init__(self, windows: Sequence[Window], counter: Counter | None = None) -> None:
        self.windows = tuple(windows)
        self._memory = MemoryCounter()
        self._counter = counter or self._memory
        self._breaker = Breaker(RETRY_SECONDS, _outage_started, _outage_ended)

    def hit(self, key: str) -> list[Count]:
        """Count one request of `key` in every window (never raises for a Redis failure)."""
        if self._counter is not self._memory and self._breaker.available():
            try:
                counts = self._counter.hit(key, self.windows)
            except redis.RedisError as error:
                self._breaker.failed(error)
            else:
                self._breaker.succeeded()
                return counts
        return self._memory.hit(key, self.windows)

    def defer(self, key: str) -> PendingCount | None:
        """A count of `key` to be made in the round trip of the request's cache lookup, or
        None when there is no Redis to share (or it is failing): then `hit` now."""
        if not isinstance(self._counter, RedisCounter) or not self._breaker.available():
            return None
        return PendingCount(self, self._counter, key)

    def redis_failed(self, key: str, error: redis.RedisError) -> list[Count]:
        """Redis failed under a deferred count: note it and count in memory."""
        self._breaker.failed(error)
        return self._memory.hit(key, self.windows)

    def redis_answered(self) -> None:
        """A deferred count came back from Redis."""
        self._breaker.succeeded()


class PendingCount:
    """One request's count, sent in the same Redis round trip as its cache lookup.

    A cached answer would otherwise make two round trips (the count, then the lookup); the
    cache queues this into its pipeline (`queue`, then `receive` or `failed`), or asks for
    it alone (`run_alone`) when it has no Redis to go to. `settle` then refuses the
    request if it is over a limit, before any work is done for it.
    """

    def __init__(self, limiter: RateLimiter, counter: RedisCounter, key: str) -> None:
        self._limiter = limiter
        self._counter = counter
        self._key = key
        self.counts: list[Count] | None = None

    def queue(self, pipe: redis.client.Pipeline) -> None:
        """Add the count to the cache's pipeline."""
        self._counter.queue(pipe, self._key, self._limiter.windows)

    def receive(self, reply: Any) -> None:
        """The script's reply from the pipeline (an exception object if it failed there)."""
        if isinstance(reply, redis.RedisError):
            # NOSCRIPT after a Redis restart or flush: the script call on its own loads it.
            self.run_alone()
            return
        self._limiter.redis_answered()
        self.counts = self._counter.parse(reply, self._limiter.windows)

    def failed(self, error: redis.RedisError) -> None:
        """The pipeline failed as a whole (Redis down, slow): count in memory."""
        self.counts = self._limiter.redis_failed(self._key, error)

    def run_alone(self) -> None:
        """Count now, in a round trip of its own (or in memory)."""
        self.counts = self._limiter.hit(self._key)

    def settle(self) -> None:
        """Counted (alone, if nobody took it along); raise `RateLimited` if over a limit."""
        if self.counts is None:
            self.run_alone()
        assert self.counts is not None
        refuse_if_over(self.counts)


def refuse_if_over(counts: Sequence[Count]) -> None:
    """Raise `RateLimited` (429, with Retry-After) if any window is over its amount."""
    over = [item for item in counts if item.count > item.window.amount]
    if over:
        wait = max(item.reset_in for item in over)
        retry = {"Retry-After": str(max(1, round(wait)))}
        raise RateLimited(headers={**headers_for(counts), **retry})


def counted_with_lookup(view: View) -> View:
    """Mark a view whose request count can ride along with its cache lookup: the view passes
    `pending()` to the service, which hands it to the cache."""
    setattr(view, _WITH_LOOKUP, True)
    return view


def pending() -> PendingCount | None:
    """This request's deferred count, if its view was marked `counted_with_lookup`."""
    found: PendingCount | None = g.get("rate_limit_pending")
    return found


def _outage_started(error: Exception) -> None:
    logger.warning(
        "rate limiter degraded: Redis failed ({}); counting in this process",
        type(error).__name__,
    )


def _outage_ended(seconds_down: float) -> None:
    logger.info("rate limiter recovered: Redis answers again after {:.1f} s", seconds_down)


def rate_limit_key() -> str:
    """The identity a request is counted against: its valid key, else its client IP."""
    fingerprint = valid_key_fingerprint(request.headers.get(API_KEY_HEADER, ""))
    if fingerprint is not None:
        return f"key:{fingerprint}"
    return f"ip:{request.remote_addr or 'unknown'}"


def headers_for(counts: Sequence[Count]) -> dict[str, str]:
    """`X-RateLimit-*` of the window closest to refusing (the fewest requests left)."""
    tightest = min(counts, key=lambda item: (item.remaining, -item.reset_in))
    return {
        "X-RateLimit-Limit": str(tightest.window.amount),
        "X-RateLimit-Remaining": str(tightest.remaining),
        "X-RateLimit-Reset": str(int(time.time() + tightest.reset_in)),
    }


def init_app(
    app: Flask, settings: Settings, limited: APIBlueprint | Sequence[APIBlueprint]
) -> RateLimiter | None:
    """Trust X-Forwarded-For if told to (PROXY_FIX_X_FOR), then limit the routes of `limited`
    (a blueprint or several), each route counted per key."""
    if settings.proxy_fix_x_for > 0:
        # Heroku's router (one hop) appends the client's address: without this every
        # request would come from the router and share one IP bucket. Without a proxy in
        # front (docker run, compose) the header is the client's own word, so it is only
        # trusted when PROXY_FIX_X_FOR says how many proxies append to it.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.proxy_fix_x_for, x_proto=settings.proxy_fix_x_for
        )
    if not settings.rate_limit:
        return None
    counter: Counter | None = None
    if settings.redis_url:
        counter = RedisCounter(redis_clients.client(settings.redis_url, redis_clients.LIMITS))
    limiter = RateLimiter(parse_windows(settings.rate_limit), counter)
    names = {
        blueprint.name
        for blueprint in ((limited,) if isinstance(limited, APIBlueprint) else limited)
    }

    @app.before_request
    def _count() -> None:
        # A CORS preflight is the browser asking, not a use of the API.
        if request.blueprint not in names or request.method == "OPTIONS":
            return
        key = f"{rate_limit_key()}:{request.endpoint}"
        view = app.view_functions.get(request.endpoint or "")
        # Deferred only with a valid key: a request without one is counted (and refused)
        # before authentication turns it away, so made-up keys meet their 429 early.
        if getattr(view, _WITH_LOOKUP, False) and key.startswith("key:"):
            g.rate_limit_pending = limiter.defer(key)
            if g.rate_limit_pending is not None:
                return
        counts = limiter.hit(key)
        g.rate_limit_counts = counts
        refuse_if_over(counts)

    @app.after_request
    def _headers(response: Response) -> Response:
        deferred = pending()
        if deferred is not None and deferred.counts is None:
            deferred.run_alone()  # the request ended before its lookup: it still counts
        counts = deferred.counts if deferred is not None else g.get("rate_limit_counts")
        if counts:
            response.headers.update(headers_for(counts))
        return response

    return limiter
