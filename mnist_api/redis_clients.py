"""The one place that turns a Redis URL into clients: TLS decided once, one pool per role.

Every part of the service that talks to Redis (the prediction cache, the job store, the rate
limiter, Celery's result backend) asks here. A role names what the connections are for and
carries their timeouts: the cache gives up after 100 ms, accepting a job may wait a second,
so they cannot share sockets, but every client of one role in one process shares one pool.

Pools are per process: a pool made before a fork (the gunicorn master, Celery's main
process) is never handed to the child, whose sockets would otherwise interleave replies with
the parent's on the same connection. The registry notes its pid and starts afresh in a child.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import redis

TLS_SCHEME = "rediss://"


@dataclass(frozen=True)
class Role:
    """What a pool's connections are for, with their timeouts in seconds."""

    name: str
    socket_timeout: float
    connect_timeout: float


# Accepting a job may wait a little for Redis; past a second the client gets a 503.
JOBS = Role("jobs", socket_timeout=1.0, connect_timeout=1.0)
# The rate limiter fails open: a slow Redis must not hold every request for long.
LIMITS = Role("limits", socket_timeout=0.2, connect_timeout=0.2)
# Celery's task results (written by workers, read by /tasks and the bulk CLI).
RESULTS = Role("results", socket_timeout=2.0, connect_timeout=1.0)


def cache_role(timeout: float) -> Role:
    """The cache's role: it gives up after `timeout` (CACHE_SOCKET_TIMEOUT) and serves uncached."""
    return Role("cache", socket_timeout=timeout, connect_timeout=timeout)


def uses_tls(url: str) -> bool:
    """True for `rediss://` URLs (Heroku Redis), whose certificate is self-signed."""
    return url.startswith(TLS_SCHEME)


def tls_options(url: str) -> dict[str, Any]:
    """Options for redis-py: with TLS, encrypt but do not verify the certificate.

    Heroku Redis presents a self-signed certificate that no CA vouches for; the connection is
    still encrypted. Nothing for plain `redis://`.
    """
    return {"ssl_cert_reqs": None} if uses_tls(url) else {}


def celery_tls_options(url: str) -> dict[str, Any] | None:
    """The same decision in the form Celery's `broker_use_ssl`/`redis_backend_use_ssl` take."""
    return {"ssl_cert_reqs": ssl.CERT_NONE} if uses_tls(url) else None


class _Registry:
    """Pools by (URL, role), valid in the process that made them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._pools: dict[tuple[str, Role], redis.ConnectionPool] = {}

    def pool(self, url: str, role: Role) -> redis.ConnectionPool:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the parent's pools and sockets belong to the parent. Drop
                # the references without closing anything (closing would shut the sockets
                # the parent still uses).
                self._pid = os.getpid()
                self._pools = {}
            found = self._pools.get((url, role))
            if found is None:
                found = redis.ConnectionPool.from_url(
                    url,
                    socket_timeout=role.socket_timeout,
                    socket_connect_timeout=role.connect_timeout,
                    client_name=f"mnist-{role.name}",
                    **tls_options(url),
                )
                self._pools[(url, role)] = found
            return found

    def count(self) -> int:
        with self._lock:
            return len(self._pools) if self._pid == os.getpid() else 0


_REGISTRY = _Registry()


def pool(url: str, role: Role) -> redis.ConnectionPool:
    """This process's connection pool for `url` and `role` (made on first use)."""
    return _REGISTRY.pool(url, role)


def client(url: str, role: Role) -> redis.Redis:
    """A client on this process's pool for `url` and `role` (cheap: no connection yet)."""
    return redis.Redis(connection_pool=pool(url, role))


def pool_count() -> int:
    """How many pools this process holds (for tests and diagnostics)."""
    return _REGISTRY.count()
