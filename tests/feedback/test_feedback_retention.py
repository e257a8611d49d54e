"""The feedback table stays bounded and is never loaded whole (issue 22): retention by age
and by rows, stats as one GROUP BY in SQL, the retrain's rows streamed in chunks. On a real
SQLite file and a real PostgreSQL server, through the `FeedbackStore` the service uses.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, func, select, update

from mnist_api.config import PROJECT_ROOT, Settings
from mnist_api.feedback.store import FeedbackEntry, FeedbackStore, Retention, retention
from mnist_api.storage import db
from mnist_api.storage.tables import feedback
from tools.postgres_server import PostgresServer, postgres_bin
from tools.services import free_port, venv_env

VERSION = "fe5e4f4d480b"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if postgres_bin() is None:
        pytest.fail("PostgreSQL is not installed: run scripts/install-system-deps.sh")
    server = PostgresServer(free_port())
    server.start()
    try:
        db.upgrade(server.url)
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated feedback table on either database."""
    if request.param == "sqlite":
        found = f"sqlite:///{tmp_path / 'feedback.db'}"
        db.upgrade(found)
        return found
    server: PostgresServer = request.getfixturevalue("postgres")
    store = FeedbackStore.from_url(server.url)
    with store.engine.begin() as connection:
        connection.execute(feedback.delete())
    store.dispose()
    return server.url


def entry(number: int, key: str = "k0000001") -> FeedbackEntry:
    image = np.zeros((28, 28), np.float32)
    image[number % 28, :] = 1.0
    return FeedbackEntry(
        key_fingerprint=key,
        sha256=f"{number:064x}",
        model_version=VERSION,
        label=number % 10,
        predicted=(number * 3) % 10,
        probability=0.5,
        image=image,
    )


def count(store: FeedbackStore) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(feedback)).scalar_one())


def test_retention_keeps_the_newest_rows_and_drops_the_old(url: str) -> None:
    store = FeedbackStore.from_url(url, retention=Retention(30, 5, every_seconds=0))
    try:
        for number in range(8):
            assert store.record(entry(number)).created
        assert count(store) == 5  # pruned after each new row, oldest first
        kept = store.rows()
        assert kept.sha256.tolist() == [f"{n:064x}" for n in range(3, 8)]
        # A row last judged 40 days ago goes, whatever the row count.
        old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
        with store.engine.begin() as connection:
            connection.execute(
                update(feedback).where(feedback.c.sha256 == f"{3:064x}").values(updated_at=old)
            )
        assert store.prune() == 1
        assert count(store) == 4
    finally:
        store.dispose()


def test_no_limit_keeps_everything_and_pruning_is_throttled(url: str) -> None:
    unlimited = FeedbackStore.from_url(url, retention=Retention(0, 0))
    throttled = FeedbackStore.from_url(url, retention=Retention(0, 2, every_seconds=3600))
    try:
        for number in range(4):
            unlimited.record(entry(number))
        assert unlimited.prune() == 0 and count(unlimited) == 4
        throttled.record(entry(10))  # the first new row of this process prunes...
        assert count(throttled) == 2
        for number in range(11, 14):
            throttled.record(entry(number))  # ...the next ones wait for the hour
        assert count(throttled) == 5
    finally:
        unlimited.dispose()
        throttled.dispose()


def statements(store: FeedbackStore) -> list[str]:
    """Every SQL statement the store's engine sends from now on."""
    seen: list[str] = []

    def remember(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(store.engine, "before_cursor_execute", remember)
    return seen


def test_stats_are_one_grouped_query_that_never_reads_the_images(url: str) -> None:
    store = FeedbackStore.from_url(url)
    try:
        for number in range(12):
            store.record(entry(number, key=f"k{number % 3:07d}"))
        sent = statements(store)
        stats = store.stats()
        assert len(sent) == 1 and "GROUP BY" in sent[0].upper()
        assert "input" not in sent[0].lower()
        assert stats[0]["count"] == 12
        assert stats[0]["correct"] == sum(1 for n in range(12) if n % 10 == (n * 3) % 10)
    finally:
        store.dispose()


def test_the_retrain_rows_stream_in_chunks_and_match_the_table(url: str) -> None:
    store = FeedbackStore.from_url(url)
    try:
        for number in range(11):
            store.record(entry(number, key=f"k{number % 2:07d}"))
        rows = store.rows(chunk=4)
        assert len(rows) == 11
        assert rows.sha256.tolist() == [f"{n:064x}" for n in range(11)]
        assert rows.labels.tolist() == [n % 10 for n in range(11)]
        assert rows.key_fingerprints.tolist() == [f"k{n % 2:07d}" for n in range(11)]
        assert rows.images.dtype == np.float32 and rows.images.shape == (11, 28, 28)
        assert all(rows.images[n][n % 28].sum() == 28 for n in range(11))
        assert np.all(np.diff(rows.times) >= 0)
        empty = FeedbackStore.from_url(url)
        with empty.engine.begin() as connection:
            connection.execute(feedback.delete())
        assert len(empty.rows()) == 0 and empty.rows().images.shape == (0, 28, 28)
        empty.dispose()
    finally:
        store.dispose()


def test_retention_settings_and_the_prune_command(tmp_path: Path) -> None:
    defaults = Settings.from_env({})
    assert retention(defaults) == Retention(365, 100_000)
    assert retention(
        Settings.from_env({"FEEDBACK_RETENTION_DAYS": "0", "FEEDBACK_MAX_ROWS": "10"})
    ) == Retention(0, 10)
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    db.upgrade(url)
    store = FeedbackStore.from_url(url, retention=Retention(0, 0))
    for number in range(5):
        store.record(entry(number))
    store.dispose()
    done = subprocess.run(
        [sys.executable, "-m", "mnist_api.db", "prune"],
        cwd=PROJECT_ROOT,
        env=venv_env(DATABASE_URL=url, FEEDBACK_MAX_ROWS="2"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "deleted 3 rows" in done.stdout
