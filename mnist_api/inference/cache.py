"""The prediction cache: Redis when `REDIS_URL` is set, else a bounded in-process LRU.

Keys are `pred:<model version>:<sha256 of the uploaded bytes>`, so a new model never serves
an old answer and a hit skips decoding, preprocessing and inference. Values are the JSON
answer. The cache is an optimisation, never a dependency: when Redis is down, refusing or
slow, every call returns "miss" within a short socket timeout, the incident is logged once,
and Redis is retried in the background of later calls until it answers again.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import redis
from loguru import logger

from mnist_api import redis_clients
from mnist_api.breaker import Breaker
from mnist_api.config import Settings

Value = dict[str, Any]
V = TypeVar("V")


def _ignore(*_args: object) -> None:
    return None


@dataclass(frozen=True)
class CacheHooks:
    """Callbacks through which a cache reports to metrics (no-ops by default)."""

    lookups: Callable[[str, int], None] = _ignore  # (result: hit|miss|error, count)
    degraded: Callable[[bool], None] = _ignore  # True when an outage starts, False when over


def cache_key(model_version: str, sha256: str, preprocessing: str = "") -> str:
    """`pred:<model version>:<sha256>`, the contract's key, with the preprocessing version.

    The preprocessing version sits inside the version part (`<model>+p<hash>`), so answers
    computed by older preprocessing code are never served after a deploy that changed it.
    """
    version = f"{model_version}+p{preprocessing}" if preprocessing else model_version
    return f"pred:{version}:{sha256}"


class RidesAlong(Protocol):
    """Other Redis work of the same request, sent in the lookup's round trip (the request's
    rate-limit count: see rate_limits.PendingCount)."""

    def queue(self, pipe: redis.client.Pipeline) -> None:
        """Add its command to the lookup's pipeline."""

    def receive(self, reply: Any) -> None:
        """Its command's reply (an exception object if that command failed)."""

    def failed(self, error: redis.RedisError) -> None:
        """The round trip failed as a whole."""

    def run_alone(self) -> None:
        """Do it without the cache (no Redis here, or the cache is leaving Redis alone)."""

    def settle(self) -> None:
        """After the lookup (the service calls it): may raise a `ServiceError`, e.g. the
        request's 429 when it is over its rate limit."""


class PredictionCache(Protocol):
    """What the service needs from a cache backend."""

    backend: str

    def get_many(self, keys: Sequence[str], along: RidesAlong | None = None) -> list[Value | None]:
        """Values for `keys` in order (None = miss), in one round trip (with `along`'s work,
        which has had its reply, failure or solo run by the time this returns)."""

    def set_many(self, items: dict[str, Value]) -> None:
        """Store several values with the TTL, in one round trip."""

    def status(self) -> str:
        """`redis`, `memory` or `degraded`, for /readyz."""


class LruTtlDict(Generic[V]):
    """A bounded, thread-safe LRU mapping whose entries also expire after a TTL."""

    def __init__(
        self, max_items: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_items = max_items
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> list[V | None]:
        """Values for `keys`; expired entries count as misses and are dropped."""
        now = self._clock()
        found: list[V | None] = []
        with self._lock:
            for key in keys:
                entry = self._items.get(key)
                if entry is None or entry[0] <= now:
                    self._items.pop(key, None)
                    found.append(None)
                    continue
                self._items.move_to_end(key)
                found.append(entry[1])
        return found

    def set_many(self, items: dict[str, V]) -> None:
        """Insert or refresh values; the least recently used go when it is full."""
        expires = self._clock() + self.ttl_seconds
        with self._lock:
            for key, value in items.items():
                self._items[key] = (expires, value)
                self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def delete(self, key: str) -> None:
        """Forget one key."""
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class MemoryCache(LruTtlDict[Value]):
    """The in-process prediction cache (`make run`, tests): an LRU that reports its lookups."""

    backend = "memory"

    def __init__(
        self,
        max_items: int,
        ttl_seconds: int,
        clock: Callable[[], float] = time.monotonic,
        hooks: CacheHooks | None = None,
    ) -> None:
        super().__init__(max_items, ttl_seconds, clock)
        self._hooks = hooks or CacheHooks()

    def get_many(self, keys: Sequence[str], along: RidesAlong | None = None) -> list[Value | None]:
        """Values for `keys`, counted as hits and misses (`along` runs on its own)."""
        if along is not None:
            along.run_alone()
        found = super().get_many(keys)
        _report(self._hooks, found)
        return found

    def set_many(self, items: dict[str, Value]) -> None:
        """Store copies, so a caller changing its answer cannot change ours."""
        super().set_many({key: dict(value) for key, value in items.items()})

    def status(self) -> str:
        """Always `memory`: it cannot fail."""
        return "memory"


def _report(hooks: CacheHooks, found: list[Value | None]) -> None:
    misses = sum(value is None for value in found)
    hooks.lookups("hit", len(found) - misses)
    hooks.lookups("miss", misses)


class RedisCache:
    """Redis-backed cache with short timeouts and a circuit breaker.

    After a failure Redis is left alone for `retry_seconds` (calls answer "miss" at once),
    then the next call tries it again: so an outage costs one timeout per retry period, not
    one per request, and the cache comes back by itself when Redis does.
    """

    backend = "redis"

    def __init__(
        self,
        client: redis.Redis,
        ttl_seconds: int,
        retry_seconds: float = 1.0,
        hooks: CacheHooks | None = None,
    ) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self._hooks = hooks or CacheHooks()
        self._breaker = Breaker(retry_seconds, self._outage_started, self._outage_ended)

    @classmethod
    def from_url(
        cls,
        url: str,
        ttl_seconds: int,
        socket_timeout: float = 0.1,
        retry_seconds: float = 1.0,
        hooks: CacheHooks | None = None,
    ) -> RedisCache:
        """Connect lazily to `redis://` or `rediss://`, on the process's shared cache pool."""
        client = redis_clients.client(url, redis_clients.cache_role(socket_timeout))
        return cls(client, ttl_seconds, retry_seconds, hooks)

    def get_many(self, keys: Sequence[str], along: RidesAlong | None = None) -> list[Value | None]:
        """MGET all keys at once (with `along`'s command in the same round trip); a Redis
        failure reads as all misses."""
        if not keys or not self._breaker.available():
            if along is not None:
                along.run_alone()
            self._hooks.lookups("error", len(keys))
            return [None] * len(keys)
        received = False
        try:
            if along is None:
                raw = self.client.mget(list(keys))
            else:
                pipe = self.client.pipeline(transaction=False)
                along.queue(pipe)
                pipe.mget(list(keys))
                reply, raw = pipe.execute(raise_on_error=False)
                along.receive(reply)
                received = True
                if isinstance(raw, redis.RedisError):
                    raise raw
        except redis.RedisError as error:
            self._breaker.failed(error)
            if along is not None and not received:
                along.failed(error)
            self._hooks.lookups("error", len(keys))
            return [None] * len(keys)
        self._breaker.succeeded()
        found = [json.loads(item) if item is not None else None for item in raw]
        _report(self._hooks, found)
        return found

    def set_many(self, items: dict[str, Value]) -> None:
        """SET ... EX ttl for every item in one pipeline; a Redis failure is only recorded."""
        if not items or not self._breaker.available():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, json.dumps(value, separators=(",", ":")), ex=self.ttl_seconds)
            pipe.execute()
        except redis.RedisError as error:
            self._breaker.failed(error)
            return
        self._breaker.succeeded()

    def status(self) -> str:
        """`redis` if Redis answers a PING now (or is known good), else `degraded`."""
        if self._breaker.available():
            try:
                self.client.ping()
            except redis.RedisError as error:
                self._breaker.failed(error)
            else:
                self._breaker.succeeded()
        return "degraded" if self._breaker.down else "redis"

    def _outage_started(self, error: Exception) -> None:
        self._hooks.degraded(True)
        logger.warning("cache degraded: Redis failed ({}); serving uncached", type(error).__name__)

    def _outage_ended(self, seconds_down: float) -> None:
        self._hooks.degraded(False)
        logger.info("cache recovered: Redis answers again after {:.1f} s", seconds_down)


def build_cache(settings: Settings, hooks: CacheHooks | None = None) -> PredictionCache:
    """Redis when `REDIS_URL` is set, else the in-process LRU."""
    if settings.redis_url:
        return RedisCache.from_url(
            settings.redis_url,
            settings.cache_ttl_seconds,
            socket_timeout=settings.cache_socket_timeout,
            retry_seconds=settings.cache_retry_seconds,
            hooks=hooks,
        )
    return MemoryCache(settings.cache_max_items, settings.cache_ttl_seconds, hooks=hooks)
