"""The database's operator commands (the Procfile's release phase runs `upgrade`).

    python -m mnist_api.db upgrade     # apply the migrations (Procfile release phase)
    python -m mnist_api.db current     # print the applied revision
    python -m mnist_api.db prune       # apply the feedback retention now
    python -m mnist_api.db revision "add a column"   # a new migration, compared with
                                       # mnist_api/storage/tables.py on an up-to-date database

An entry point above the layers, like the app factory: `prune` needs the feedback store,
which itself sits above the storage package.
"""

from __future__ import annotations

import sys

from mnist_api.config import Settings
from mnist_api.feedback.store import FeedbackStore, retention
from mnist_api.storage.db import (
    _alembic_command,
    alembic_config,
    current_revision,
    describe,
    upgrade,
)


def main(argv: list[str] | None = None) -> int:
    """`upgrade` or `current` on DATABASE_URL (the embedded SQLite file when unset)."""
    args = sys.argv[1:] if argv is None else argv
    settings = Settings.from_env()
    url = settings.database_url
    if args == ["upgrade"]:
        upgrade(url)
        print(f"database {describe(url)} at revision {current_revision(url)}")
        return 0
    if args == ["current"]:
        print(current_revision(url) or "empty (no migration applied)")
        return 0
    if args == ["prune"]:
        store = FeedbackStore.from_url(url, timeout=30.0, retention=retention(settings))
        try:
            print(f"feedback retention deleted {store.prune()} rows from {describe(url)}")
        finally:
            store.dispose()
        return 0
    if len(args) == 2 and args[0] == "revision":
        _alembic_command().revision(alembic_config(url), message=args[1], autogenerate=True)
        return 0
    print(
        'usage: python -m mnist_api.db upgrade|current|prune|revision "message"',
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
