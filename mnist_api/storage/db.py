"""The SQL database of the feedback store: engine from DATABASE_URL, and Alembic migrations.

`DATABASE_URL` unset: an embedded SQLite file under `instance/` (so `make run` needs
nothing). Heroku Postgres' `postgres://` (and plain `postgresql://`) URLs are rewritten to
SQLAlchemy's psycopg 3 driver. Every connection has short timeouts: a database that is down
or locked makes /feedback answer 503 within seconds instead of holding a worker thread.

"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from mnist_api.config import PROJECT_ROOT

if TYPE_CHECKING:
    from alembic.config import Config

DEFAULT_SQLITE_PATH = PROJECT_ROOT / "instance" / "feedback.db"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL for DATABASE_URL: the SQLite default, or Postgres on psycopg 3."""
    if not url:
        return f"sqlite:///{DEFAULT_SQLITE_PATH}"
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def is_sqlite(url: str) -> bool:
    """True when the (normalised) URL names an embedded SQLite database."""
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def build_engine(url: str, timeout: float = 3.0) -> Engine:
    """An engine for DATABASE_URL with short timeouts; it connects lazily, on first use."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # The default file's folder may not exist yet on a fresh clone. If it cannot be
            # made, the first use fails, and /feedback answers 503: never the start.
            with contextlib.suppress(OSError):
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # `timeout`: how long a write waits for another writer's lock before "locked".
        return create_engine(url, connect_args={"timeout": timeout})
    millis = int(timeout * 1000)
    engine = create_engine(
        url,
        connect_args={"connect_timeout": max(1, round(timeout))},
        pool_pre_ping=True,  # a server restart must not cost the next request its answer
        pool_size=2,  # per worker process; Heroku's small plans allow ~20 connections
        max_overflow=2,
        pool_timeout=timeout,
    )

    @event.listens_for(engine, "connect")
    def _limit_statements(dbapi_connection: Any, _record: Any) -> None:
        # Set per session rather than in the startup packet, so it also works behind a
        # connection pooler (PgBouncer refuses unknown startup options).
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {millis}")
            cursor.execute(f"SET lock_timeout = {millis}")
        dbapi_connection.commit()

    return engine


def alembic_config(url: str) -> Config:
    """Alembic's configuration, in code (no alembic.ini): the migrations folder and the URL."""
    from alembic.config import Config  # noqa: PLC0415 - see _alembic_command

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolates '%': a password with one must be escaped.
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def _alembic_command() -> Any:
    """Alembic's commands, imported only when a migration runs: importing Alembic costs a
    web worker about 11 MB of memory, and workers never migrate (the release phase does)."""
    from alembic import command  # noqa: PLC0415

    return command


def upgrade(url: str, revision: str = "head", timeout: float = 10.0) -> None:
    """Apply the migrations up to `revision` on the database at `url` (idempotent)."""
    engine = build_engine(url, timeout)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            _alembic_command().upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str, timeout: float = 10.0) -> str | None:
    """The revision the database is at, None before the first migration."""
    engine = build_engine(url, timeout)
    try:
        with engine.connect() as connection:
            from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    return make_url(normalize_url(url)).render_as_string(hide_password=True)
