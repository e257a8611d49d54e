"""Celery's Redis result backend on the service's shared connection pool.

Celery builds one result backend per thread, each with its own connection pool: in a
gunicorn worker with four threads that is four pools next to the ones of the cache and the
job store. This backend takes its connections from `mnist_api.redis_clients` instead (role
`RESULTS`), so result reads and writes of one process share one pool, made after the fork.
Select it with `result_backend = backend_url(REDIS_URL)`.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend

from mnist_api import redis_clients

BACKEND_CLASS = f"{__name__}:PooledRedisBackend"


def backend_url(redis_url: str) -> str:
    """The `result_backend` setting that selects this backend for `redis_url`.

    Celery reads `<module>:<class>+<url>` as "this backend class, on this URL".
    """
    return f"{BACKEND_CLASS}+{redis_url}"


class PooledRedisBackend(RedisBackend):
    """Celery's Redis result backend whose connections come from the shared pool."""

    url: str  # set by RedisBackend.__init__ (missing from celery-types' stub)

    def _get_pool(self, **params: Any) -> Any:
        # Celery's connection parameters (host, timeouts, TLS) are replaced by the shared
        # pool's, which come from the same URL; the TLS decision is made there.
        return redis_clients.pool(self.url, redis_clients.RESULTS)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Do not subscribe to the task's result channel when it is queued.

        Celery would otherwise open a pub/sub connection per thread for every task sent, so
        that a later `result.get()` could wait on it. This service polls results by key
        (`/tasks/<id>`, the bulk CLI), so the subscriptions would only cost connections.
        """
