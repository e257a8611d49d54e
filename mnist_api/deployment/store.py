"""Where the deployment lives: the SQL database (DATABASE_URL, else the embedded SQLite
file), shared by every worker and dyno that reads it, and durable (issue 21).

The deployment is one row (`deployment_state`) holding its JSON document, next to its
history (`deployment_history`, newest first by id) and per-deployment counters
(`deployment_counts`: deployment id, version, field -> count, which the guard and the bandit
read). A change is one transaction that updates the row only if the stored id is still the
one the change was based on, and inserts the history entry with it: two admins at once, one
wins whole. Any database failure becomes `DeploymentStoreUnavailable` (503); nothing is half
done. Redis plays no part: flushing or restarting it changes no decision.

`MemoryDeploymentStore` keeps the same in one process, for unit tests of the rules.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from loguru import logger
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mnist_api.deployment.value import Deployment
from mnist_api.errors import DeploymentStoreUnavailable
from mnist_api.storage.db import build_engine
from mnist_api.storage.tables import deployment_counts, deployment_history, deployment_state

HISTORY_SIZE = 100  # the in-process store keeps this many; the database keeps them all
_CURRENT = "current"  # the one row of deployment_state

# (deployment id, version, field) -> count; fields: requests, low_confidence, errors,
# feedback, correct.
CountKey = tuple[str, str, str]
# version -> field -> count, for one deployment id.
Counts = dict[str, dict[str, int]]


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

    def dispose(self) -> None:
        """Let go of connections (a command-line run that is done)."""


class MemoryDeploymentStore:
    """The deployment of one process (unit tests of the rules and the router)."""

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

    def dispose(self) -> None:
        """Nothing to let go of."""


class SqlDeploymentStore:
    """The deployment in the SQL database (DATABASE_URL, else the embedded SQLite file):
    shared by every worker of every machine that reads the same database, and durable."""

    backend = "sql"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str, timeout: float = 3.0) -> SqlDeploymentStore:
        """A store on DATABASE_URL ("" = the embedded SQLite file); connects on first use."""
        return cls(build_engine(url, timeout))

    def load(self) -> Deployment | None:
        """The stored deployment, or None before the first change."""
        query = select(deployment_state.c.document).where(deployment_state.c.name == _CURRENT)
        try:
            with self.engine.connect() as connection:
                raw = connection.execute(query).scalar_one_or_none()
        except SQLAlchemyError as error:
            raise _unavailable(error) from None
        return None if raw is None else Deployment.from_dict(json.loads(raw))

    def replace(self, expected_id: str, new: Deployment, entry: Mapping[str, Any]) -> bool:
        """One transaction: compare the stored id and swap the document, add the history
        row. False (and nothing written) when another change came first."""
        now = datetime.datetime.now(datetime.UTC)
        document = json.dumps(new.to_dict())
        try:
            with self.engine.begin() as connection:
                if expected_id:
                    # In PostgreSQL a concurrent UPDATE waits for the other one's commit and
                    # then re-checks the WHERE on the new row: the loser updates nothing.
                    written = connection.execute(
                        update(deployment_state)
                        .where(
                            deployment_state.c.name == _CURRENT,
                            deployment_state.c.deployment_id == expected_id,
                        )
                        .values(deployment_id=new.id, document=document, updated_at=now)
                    ).rowcount
                    if written != 1:
                        raise _Lost()
                else:  # the first change: the primary key lets only one insert win
                    connection.execute(
                        insert(deployment_state).values(
                            name=_CURRENT, deployment_id=new.id, document=document, updated_at=now
                        )
                    )
                connection.execute(
                    insert(deployment_history).values(
                        deployment_id=new.id,
                        reason=str(entry.get("reason", ""))[:16],
                        updated_by=str(entry.get("updated_by", ""))[:64],
                        created_at=now,
                        entry=json.dumps(dict(entry)),
                    )
                )
        except (_Lost, IntegrityError):
            return False
        except SQLAlchemyError as error:
            raise _unavailable(error) from None
        return True

    def history(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` entries, newest first."""
        query = (
            select(deployment_history.c.entry)
            .order_by(deployment_history.c.id.desc())
            .limit(max(limit, 1))
        )
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(query).scalars().all()
        except SQLAlchemyError as error:
            raise _unavailable(error) from None
        return [json.loads(row) for row in rows]

    def add_counts(self, counts: Mapping[CountKey, int]) -> None:
        """Add every count in one transaction (an upsert per deployment, version, field)."""
        if not counts:
            return
        dialect = self.engine.dialect.name
        upsert: Any = postgresql_insert if dialect == "postgresql" else sqlite_insert
        try:
            with self.engine.begin() as connection:
                # Sorted: two workers upserting the same rows lock them in the same order,
                # so PostgreSQL never sees a deadlock between them.
                for (deployment_id, version, name), count in sorted(counts.items()):
                    statement = upsert(deployment_counts).values(
                        deployment_id=deployment_id, version=version, field=name, count=count
                    )
                    connection.execute(
                        statement.on_conflict_do_update(
                            index_elements=["deployment_id", "version", "field"],
                            set_={"count": deployment_counts.c.count + statement.excluded.count},
                        )
                    )
        except SQLAlchemyError as error:
            raise _unavailable(error) from None

    def counts(self, deployment_id: str) -> Counts:
        """One deployment's counters, by version."""
        query = select(
            deployment_counts.c.version, deployment_counts.c.field, deployment_counts.c.count
        ).where(deployment_counts.c.deployment_id == deployment_id)
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
        except SQLAlchemyError as error:
            raise _unavailable(error) from None
        result: Counts = {}
        for version, name, count in rows:
            result.setdefault(version, {})[name] = int(count)
        return result

    def dispose(self) -> None:
        """Close the pooled connections (the CLI, the release phase, tests)."""
        self.engine.dispose()


class _Lost(Exception):
    """Another change came first (rolls the transaction back)."""


def _unavailable(error: SQLAlchemyError) -> DeploymentStoreUnavailable:
    # The error's class only: its text may hold the URL. Debug: the router logs an outage
    # once (not every second), and an admin's change answers 503 with its own log line.
    logger.debug("deployment store unavailable: {}", type(error).__name__)
    return DeploymentStoreUnavailable()


def build_deployment_store(database_url: str, timeout: float = 3.0) -> DeploymentStore:
    """The deployment in the SQL database at `database_url` (the embedded SQLite file when
    empty): the same place on every worker, kept whatever happens to Redis."""
    return SqlDeploymentStore.from_url(database_url, timeout)
