"""Alembic's environment: run the migrations on the connection `mnist_api.storage.db` hands over.

`mnist_api.storage.db.upgrade` opens the connection (with its timeouts) and passes it in
`config.attributes["connection"]`; the `alembic` command line, without one, connects to the
URL in the configuration.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from mnist_api.storage.db import build_engine
from mnist_api.storage.tables import metadata

config = context.config


def run(connection: Connection) -> None:
    """Run the migrations in one transaction on `connection`."""
    # render_as_batch: SQLite can only change a table by copying it; Alembic does that.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


given = config.attributes.get("connection")
if given is not None:
    run(given)
else:
    engine = build_engine(config.get_main_option("sqlalchemy.url") or "", timeout=10.0)
    with engine.begin() as connection:
        run(connection)
    engine.dispose()
