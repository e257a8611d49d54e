"""Where the deployment lives: Redis with `REDIS_URL` (shared by every worker and dyno),
else the process.

In Redis the deployment is one JSON document (`mnist:deployment`) next to its history (a
list, newest first, capped at `HISTORY_SIZE`) and per-deployment counters (a hash per
deployment id: `<version>:<field>` -> count, which the guard and the bandit read). A change
is one Lua script that writes only if the stored id is still the one the change was based
on, and writes the document and its history entry together: two admins at once, one wins
whole. Any Redis failure becomes `DeploymentStoreUnavailable` (503); nothing is half done.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import redis

from mnist_api import redis_clients
from mnist_api.deployment import Deployment
from mnist_api.errors import DeploymentStoreUnavailable

DEPLOYMENT_KEY = "mnist:deployment"
HISTORY_KEY = "mnist:deployment:history"
STATS_PREFIX = "mnist:deployment:stats:"
HISTORY_SIZE = 100
# A deployment's counters outlive it long enough for anyone to look back at them.
STATS_TTL_SECONDS = 30 * 86_400

# (deployment id, version, field) -> count; fields: requests, low_confidence, errors,
# feedback, correct.
CountKey = tuple[str, str, str]
# version -> field -> count, for one deployment id.
Counts = dict[str, dict[str, int]]

# KEYS: document, history. ARGV: expected id ("" = nothing stored yet), new document,
# history entry, history size. Returns 1 when written, 0 when another change came first.
_REPLACE = """
local current = redis.call('GET', KEYS[1])
local current_id = ''
if current then current_id = cjson.decode(current)['id'] end
if current_id ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
return 1
"""


class DeploymentStore(Protocol):
    """What the manager and the router need from a deployment store."""

    backend: str

    def load(self) -> Deployment | None:
        """The stored deployment, or None before the first change."""

    def replace(self, expected_id: str, new: Deployment, entry: Mapping[str, Any]) -> bool:
        """Store `new` and its history `entry` if the stored id is `expected_id` ("" when
        nothing is stored); False (nothing written) when another change came first."""

    def history(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` history entries, newest first."""

    def add_counts(self, counts: Mapping[CountKey, int]) -> None:
        """Add per-version counts of several deployments at once."""

    def counts(self, deployment_id: str) -> Counts:
        """Every version's counts under one deployment."""


class MemoryDeploymentStore:
    """The deployment of one process (`make run`, tests without Redis)."""

    backend = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deployment: Deployment | None = None
        self._history: list[dict[str, Any]] = []
        self._counts: dict[str, Counts] = {}

    def load(self) -> Deployment | None:
        """The deployment, or None before the first change."""
        return self._deployment

    def replace(self, expected_id: str, new: Deployment, entry: Mapping[str, Any]) -> bool:
        """Compare the id and swap, under the lock."""
        with self._lock:
            current_id = self._deployment.id if self._deployment else ""
            if current_id != expected_id:
                return False
            self._deployment = new
            self._history = [dict(entry), *self._history][:HISTORY_SIZE]
            return True

    def history(self, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            return [dict(entry) for entry in self._history[:limit]]

    def add_counts(self, counts: Mapping[CountKey, int]) -> None:
        """Add to the in-process counters."""
        with self._lock:
            for (deployment_id, version, name), count in counts.items():
                fields = self._counts.setdefault(deployment_id, {}).setdefault(version, {})
                fields[name] = fields.get(name, 0) + count

    def counts(self, deployment_id: str) -> Counts:
        """A copy of one deployment's counters."""
        with self._lock:
            stored = self._counts.get(deployment_id, {})
            return {version: dict(fields) for version, fields in stored.items()}


class RedisDeploymentStore:
    """The deployment in Redis, shared by every worker of every dyno."""

    backend = "redis"

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._replace = client.register_script(_REPLACE)

    @classmethod
    def from_url(cls, url: str, socket_timeout: float = 1.0) -> RedisDeploymentStore:
        """A store on `url` (the process's shared pool for it); calls give up after
        `socket_timeout` seconds."""
        role = redis_clients.Role("deployments", socket_timeout, socket_timeout)
        return cls(redis_clients.client(url, role))

    def load(self) -> Deployment | None:
        """The stored deployment, or None before the first change."""
        try:
            raw = self._client.get(DEPLOYMENT_KEY)
        except redis.RedisError as error:
            raise DeploymentStoreUnavailable() from error
        if raw is None:
            return None
        return Deployment.from_dict(json.loads(raw))

    def replace(self, expected_id: str, new: Deployment, entry: Mapping[str, Any]) -> bool:
        """One Lua script: compare the stored id, then write the document and the history."""
        try:
            written = self._replace(
                keys=[DEPLOYMENT_KEY, HISTORY_KEY],
                args=[
                    expected_id,
                    json.dumps(new.to_dict()),
                    json.dumps(dict(entry)),
                    HISTORY_SIZE,
                ],
            )
        except redis.RedisError as error:
            raise DeploymentStoreUnavailable() from error
        return bool(written)

    def history(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` entries, newest first."""
        try:
            raw = self._client.lrange(HISTORY_KEY, 0, max(limit, 1) - 1)
        except redis.RedisError as error:
            raise DeploymentStoreUnavailable() from error
        return [json.loads(item) for item in raw]

    def add_counts(self, counts: Mapping[CountKey, int]) -> None:
        """HINCRBY every count in one pipelined round trip."""
        if not counts:
            return
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for (deployment_id, version, name), count in counts.items():
                    pipe.hincrby(STATS_PREFIX + deployment_id, f"{version}:{name}", count)
                for deployment_id in {key[0] for key in counts}:
                    pipe.expire(STATS_PREFIX + deployment_id, STATS_TTL_SECONDS)
                pipe.execute()
        except redis.RedisError as error:
            raise DeploymentStoreUnavailable() from error

    def counts(self, deployment_id: str) -> Counts:
        """HGETALL of one deployment's counters, by version."""
        try:
            raw = self._client.hgetall(STATS_PREFIX + deployment_id)
        except redis.RedisError as error:
            raise DeploymentStoreUnavailable() from error
        result: Counts = {}
        for key, value in raw.items():
            text = key.decode() if isinstance(key, bytes) else str(key)
            version, _, name = text.rpartition(":")
            result.setdefault(version, {})[name] = int(value)
        return result


def build_deployment_store(redis_url: str) -> DeploymentStore:
    """Redis when `redis_url` is set, else the process."""
    if redis_url:
        return RedisDeploymentStore.from_url(redis_url)
    return MemoryDeploymentStore()
