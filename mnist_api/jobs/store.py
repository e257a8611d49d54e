"""Where async jobs keep their inputs and the ids they issued: Redis, or memory in eager mode.

Uploads are stored under `upload:<sha256>` so a task message carries only that key; issued
task ids under `task:<id>`, so `/tasks/<id>` can tell an unknown id (404) from a pending one.

An upload is held by the tasks that need it: `upload-holders:<sha256>` is the set of their
ids. Two jobs with the same bytes share one copy; when a task has run (success or final
failure) it releases its hold, and the last release deletes the upload, so nothing waits in
Redis for its TTL. All held uploads together, each charged its bytes plus
`UPLOAD_OVERHEAD_BYTES`, stay under a budget (`ASYNC_QUEUE_MAX_BYTES`): past it a new job
is refused (`QueueFull`, 503) instead of filling Redis, which also holds the cache and the
broker. The TTL (`RESULT_EXPIRES_SECONDS`) remains as a backstop for a task that never
completes.

A Redis failure here is not optional as the cache is: it means the job cannot be accepted,
and becomes `BrokerUnavailable` (503).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import redis

from mnist_api import redis_clients
from mnist_api.config import UPLOAD_OVERHEAD_BYTES, Settings
from mnist_api.errors import BrokerUnavailable, QueueFull
from mnist_api.inference.cache import LruTtlDict
from mnist_api.jobs.redis_scripts import HOLD_SCRIPT, RELEASE_SCRIPT

T = TypeVar("T")
UPLOAD_PREFIX = "upload:"
HOLDERS_PREFIX = "upload-holders:"
TASK_PREFIX = "task:"
# Deliveries of each task's message, per retry (a hash: retry number -> deliveries).
DELIVERIES_PREFIX = "deliveries:"
# Ids of the tasks given up after too many deliveries, newest first, at most DEAD_LETTERS_KEPT.
DEAD_LETTERS = "dead:tasks"
DEAD_LETTERS_KEPT = 1000
# The budget's bookkeeping: expiry time per held upload, its size, and the sum of sizes.
HELD_EXPIRY = "uploads:expiry"
HELD_SIZE = "uploads:size"
HELD_BYTES = "uploads:bytes"
# UPLOAD_OVERHEAD_BYTES (config): what one held upload costs Redis besides its bytes,
# charged to the budget so that many tiny uploads cannot slip past it: the key, the holders
# set, the bookkeeping entries and the queued task message (measured: about 1.6 KB).


class JobStore(Protocol):
    """Upload bytes held for their tasks, and issued task ids, with a TTL."""

    def hold_uploads(self, uploads: Mapping[str, bytes], holder: str) -> None:
        """Keep these uploads (by SHA-256) for task `holder`; `QueueFull` if over budget.

        All or nothing: when it raises, none of them is held.
        """

    def get_uploads(self, sha256s: Sequence[str]) -> list[bytes | None]:
        """The uploads for these hashes (None if expired or released)."""

    def release_uploads(self, sha256s: Sequence[str], holder: str) -> None:
        """Task `holder` is done with these uploads; an upload nobody holds is deleted."""

    def held_bytes(self) -> int:
        """Bytes of uploads held now (what counts against the budget)."""

    def issue(self, task_id: str) -> None:
        """Remember that this service issued `task_id`."""

    def forget(self, task_id: str) -> None:
        """Undo `issue` (the task could not be queued after all)."""

    def was_issued(self, task_id: str) -> bool:
        """True if this service issued `task_id` and it has not expired."""

    def reachable(self) -> bool:
        """True if the store answers now."""

    def record_delivery(self, task_id: str, retries: int) -> int:
        """Count one more delivery of this retry of `task_id`; return how many so far."""

    def clear_deliveries(self, task_id: str) -> None:
        """Forget the counts of a task that has run."""

    def dead_letter(self, task_id: str) -> None:
        """Add `task_id` to the dead-letter list (for operators to look into)."""


def cost(data: bytes) -> int:
    """What holding an upload counts against the budget."""
    return len(data) + UPLOAD_OVERHEAD_BYTES


def _upload_keys(sha256s: Sequence[str]) -> list[str]:
    keys = [HELD_EXPIRY, HELD_SIZE, HELD_BYTES]
    for sha in sha256s:
        keys += [UPLOAD_PREFIX + sha, HOLDERS_PREFIX + sha]
    return keys


class RedisJobStore:
    """The job store on the same Redis as the broker."""

    def __init__(self, client: redis.Redis, ttl_seconds: int, max_held_bytes: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self.max_held_bytes = max_held_bytes
        self._hold = client.register_script(HOLD_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    def hold_uploads(self, uploads: Mapping[str, bytes], holder: str) -> None:
        """One script: drop expired entries, check the budget, store and hold them all."""
        if not uploads:
            return
        args: list[str | bytes | int] = [
            holder,
            self.ttl_seconds,
            self.max_held_bytes,
            UPLOAD_OVERHEAD_BYTES,
        ]
        for sha, data in uploads.items():
            args += [sha, data]
        held = self._call(lambda: self._hold(keys=_upload_keys(list(uploads)), args=args))
        if not held:
            raise QueueFull()

    def get_uploads(self, sha256s: Sequence[str]) -> list[bytes | None]:
        """MGET the uploads in one round trip."""
        keys = [UPLOAD_PREFIX + sha for sha in sha256s]
        found = self._call(lambda: self.client.mget(keys))
        return [item if isinstance(item, bytes) else None for item in found]

    def release_uploads(self, sha256s: Sequence[str], holder: str) -> None:
        """One script: drop `holder` from each upload's holders; delete what nobody holds."""
        unique = list(dict.fromkeys(sha256s))
        if unique:
            self._call(lambda: self._release(keys=_upload_keys(unique), args=[holder, *unique]))

    def held_bytes(self) -> int:
        """The budget's counter (expired uploads are only subtracted at the next hold)."""
        return int(self._call(lambda: self.client.get(HELD_BYTES)) or 0)

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

    def record_delivery(self, task_id: str, retries: int) -> int:
        """HINCRBY deliveries:<id> <retries>, with the TTL (a message lives no longer)."""
        key = DELIVERIES_PREFIX + task_id

        def count() -> int:
            pipe = self.client.pipeline()
            pipe.hincrby(key, str(retries), 1)
            pipe.expire(key, self.ttl_seconds)
            return int(pipe.execute()[0])

        return self._call(count)

    def clear_deliveries(self, task_id: str) -> None:
        """DEL deliveries:<id>, best effort (it expires with its TTL anyway)."""
        with contextlib.suppress(redis.RedisError):
            self.client.delete(DELIVERIES_PREFIX + task_id)

    def dead_letter(self, task_id: str) -> None:
        """LPUSH dead:tasks, trimmed to the newest DEAD_LETTERS_KEPT, with the TTL."""

        def push() -> None:
            pipe = self.client.pipeline()
            pipe.lpush(DEAD_LETTERS, task_id)
            pipe.ltrim(DEAD_LETTERS, 0, DEAD_LETTERS_KEPT - 1)
            pipe.expire(DEAD_LETTERS, self.ttl_seconds)
            pipe.execute()

        self._call(push)

    @staticmethod
    def _call(operation: Callable[[], T]) -> T:
        try:
            return operation()
        except redis.RedisError as error:
            raise BrokerUnavailable() from error


@dataclass
class _Held:
    data: bytes
    expires: float
    holders: set[str] = field(default_factory=set)


class MemoryJobStore:
    """The job store of a single process without Redis (`make run`: tasks run eagerly)."""

    def __init__(
        self,
        ttl_seconds: int,
        max_held_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_held_bytes = max_held_bytes
        self._clock = clock
        self._uploads: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._tasks: LruTtlDict[bool] = LruTtlDict(100_000, ttl_seconds)

    def hold_uploads(self, uploads: Mapping[str, bytes], holder: str) -> None:
        """Keep the uploads in memory, within the same byte budget as Redis."""
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            adding = sum(cost(data) for sha, data in uploads.items() if sha not in self._uploads)
            if self._held_bytes() + adding > self.max_held_bytes:
                raise QueueFull()
            for sha, data in uploads.items():
                held = self._uploads.setdefault(sha, _Held(data, 0.0))
                held.expires = now + self.ttl_seconds
                held.holders.add(holder)

    def get_uploads(self, sha256s: Sequence[str]) -> list[bytes | None]:
        """The uploads still in memory."""
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            found = [self._uploads.get(sha) for sha in sha256s]
        return [held.data if held is not None else None for held in found]

    def release_uploads(self, sha256s: Sequence[str], holder: str) -> None:
        """Drop `holder`'s hold; an upload nobody holds is deleted."""
        with self._lock:
            for sha in sha256s:
                held = self._uploads.get(sha)
                if held is None:
                    continue
                held.holders.discard(holder)
                if not held.holders:
                    del self._uploads[sha]

    def held_bytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            self._drop_expired(self._clock())
            return self._held_bytes()

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

    def record_delivery(self, task_id: str, retries: int) -> int:
        """Eager tasks run in the process that accepted them: they are delivered once."""
        return 1

    def clear_deliveries(self, task_id: str) -> None:
        """Nothing is counted."""

    def dead_letter(self, task_id: str) -> None:
        """Eager tasks are never dead-lettered."""

    def _held_bytes(self) -> int:
        return sum(cost(held.data) for held in self._uploads.values())

    def _drop_expired(self, now: float) -> None:
        for sha in [sha for sha, held in self._uploads.items() if held.expires <= now]:
            del self._uploads[sha]


class FileJobStore(MemoryJobStore):
    """Without Redis, under gunicorn: task ids shared by the workers of one machine.

    Tasks run eagerly, inside the request that accepts them, so uploads stay in that
    process's memory; but the poll of `/tasks/<id>` may land on any worker, so the ids are
    files in `<folder>/tasks` and Celery's results files in `<folder>/results` (its file
    system backend). Files older than the TTL are removed now and then.
    """

    PRUNE_EVERY_SECONDS = 60.0

    def __init__(self, folder: Path, ttl_seconds: int, max_held_bytes: int) -> None:
        super().__init__(ttl_seconds, max_held_bytes)
        self.tasks = folder / "tasks"
        self.results = local_results_folder(folder)
        for path in (self.tasks, self.results):
            path.mkdir(parents=True, exist_ok=True)
        self._pruned_at = 0.0

    def issue(self, task_id: str) -> None:
        """Create tasks/<id> (its mtime says when)."""
        self._prune()
        self._task_file(task_id).touch()

    def forget(self, task_id: str) -> None:
        """Remove tasks/<id>."""
        self._task_file(task_id).unlink(missing_ok=True)

    def was_issued(self, task_id: str) -> bool:
        """tasks/<id> exists and is younger than the TTL."""
        try:
            issued = self._task_file(task_id).stat().st_mtime
        except OSError:
            return False
        return time.time() - issued < self.ttl_seconds

    def prune(self) -> int:
        """Remove task ids and results older than the TTL; return how many files went."""
        cutoff = time.time() - self.ttl_seconds
        removed = 0
        for folder in (self.tasks, self.results):
            for path in folder.iterdir():
                with contextlib.suppress(OSError):  # another worker may prune it first
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        return removed

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned_at >= self.PRUNE_EVERY_SECONDS:
            self._pruned_at = now
            self.prune()

    def _task_file(self, task_id: str) -> Path:
        # Only uuids reach here (the routes check them), so the name is a plain file name.
        return self.tasks / task_id


def local_results_folder(jobs_dir: Path) -> Path:
    """Where Celery's file system result backend writes without Redis."""
    return jobs_dir / "results"


def build_job_store(settings: Settings) -> JobStore:
    """Redis when configured (the shared `JOBS` pool: 1 s timeouts); else files shared by
    gunicorn's workers (LOCAL_JOBS_DIR); else this process's memory."""
    ttl, budget = settings.result_expires_seconds, settings.async_queue_max_bytes
    if settings.redis_url:
        client = redis_clients.client(settings.redis_url, redis_clients.JOBS)
        return RedisJobStore(client, ttl, budget)
    if settings.local_jobs_dir:
        return FileJobStore(Path(settings.local_jobs_dir), ttl, budget)
    return MemoryJobStore(ttl, budget)
