"""Where async jobs keep their inputs and the ids they issued: Redis, or memory in eager mode.

Uploads are stored under `upload:<sha256>` so a task message carries only that key; issued
task ids under `task:<id>`, so `/tasks/<id>` can tell an unknown id (404) from a pending one.
Both expire with the task results. A Redis failure here is not optional as the cache is:
it means the job cannot be accepted, and becomes `BrokerUnavailable` (503).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import redis

from mnist_api import redis_clients
from mnist_api.cache import LruTtlDict
from mnist_api.errors import BrokerUnavailable

T = TypeVar("T")
UPLOAD_PREFIX = "upload:"
TASK_PREFIX = "task:"


class JobStore(Protocol):
    """Upload bytes and issued task ids, with a TTL."""

    def put_upload(self, sha256: str, data: bytes) -> None:
        """Keep an upload for the worker."""

    def get_uploads(self, sha256s: Sequence[str]) -> list[bytes | None]:
        """The uploads for these hashes (None if expired)."""

    def issue(self, task_id: str) -> None:
        """Remember that this service issued `task_id`."""

    def forget(self, task_id: str) -> None:
        """Undo `issue` (the task could not be queued after all)."""

    def was_issued(self, task_id: str) -> bool:
        """True if this service issued `task_id` and it has not expired."""

    def reachable(self) -> bool:
        """True if the store answers now."""


class RedisJobStore:
    """The job store on the same Redis as the broker."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds

    def put_upload(self, sha256: str, data: bytes) -> None:
        """SET upload:<sha256> with the TTL."""
        self._call(lambda: self.client.set(UPLOAD_PREFIX + sha256, data, ex=self.ttl_seconds))

    def get_uploads(self, sha256s: Sequence[str]) -> list[bytes | None]:
        """MGET the uploads in one round trip."""
        keys = [UPLOAD_PREFIX + sha for sha in sha256s]
        found = self._call(lambda: self.client.mget(keys))
        return [item if isinstance(item, bytes) else None for item in found]

    def issue(self, task_id: str) -> None:
        """SET task:<id> with the TTL of the results."""
        self._call(lambda: self.client.set(TASK_PREFIX + task_id, 1, ex=self.ttl_seconds))

    def forget(self, task_id: str) -> None:
        """DEL task:<id>, best effort."""
        with contextlib.suppress(redis.RedisError):  # it expires with its TTL anyway
            self.client.delete(TASK_PREFIX + task_id)

    def was_issued(self, task_id: str) -> bool:
        """EXISTS task:<id>."""
        return bool(self._call(lambda: self.client.exists(TASK_PREFIX + task_id)))

    def reachable(self) -> bool:
        """PING."""
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    @staticmethod
    def _call(operation: Callable[[], T]) -> T:
        try:
            return operation()
        except redis.RedisError as error:
            raise BrokerUnavailable() from error


class MemoryJobStore:
    """The job store of a single process without Redis (`make run`: tasks run eagerly)."""

    def __init__(self, ttl_seconds: int, max_uploads: int = 1000) -> None:
        self._uploads: LruTtlDict[bytes] = LruTtlDict(max_uploads, ttl_seconds)
        self._tasks: LruTtlDict[bool] = LruTtlDict(100_000, ttl_seconds)

    def put_upload(self, sha256: str, data: bytes) -> None:
        """Keep the upload in memory."""
        self._uploads.set_many({sha256: data})

    def get_uploads(self, sha256s: Sequence[str]) -> list[bytes | None]:
        """The uploads still in memory."""
        return self._uploads.get_many(sha256s)

    def issue(self, task_id: str) -> None:
        """Remember the id."""
        self._tasks.set_many({task_id: True})

    def forget(self, task_id: str) -> None:
        """Forget the id."""
        self._tasks.delete(task_id)

    def was_issued(self, task_id: str) -> bool:
        """True if remembered."""
        return self._tasks.get_many([task_id])[0] is not None

    def reachable(self) -> bool:
        """Memory is always there."""
        return True


def build_job_store(redis_url: str, ttl_seconds: int) -> JobStore:
    """Redis when configured (the shared `JOBS` pool: 1 s timeouts), else memory."""
    if not redis_url:
        return MemoryJobStore(ttl_seconds)
    return RedisJobStore(redis_clients.client(redis_url, redis_clients.JOBS), ttl_seconds)
