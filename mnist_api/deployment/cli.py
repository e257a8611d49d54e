"""The deployment from the command line, on the same store as the service (the database:
DATABASE_URL, else the embedded SQLite file).

    python -m mnist_api.deployment.cli status
    python -m mnist_api.deployment.cli shadow 3f2a9c1b7d4e
    python -m mnist_api.deployment.cli canary 3f2a9c1b7d4e 0.1
    python -m mnist_api.deployment.cli ab 3f2a9c1b7d4e 0.5
    python -m mnist_api.deployment.cli bandit 3f2a9c1b7d4e
    python -m mnist_api.deployment.cli single            # end the experiment, keep stable
    python -m mnist_api.deployment.cli promote
    python -m mnist_api.deployment.cli rollback
    python -m mnist_api.deployment.cli history [N]

Prints the resulting deployment (or the history) as JSON. Talks to the database directly,
not over HTTP, so it needs no key: whoever can run it on a dyno (`heroku run`) already holds
DATABASE_URL. Every worker takes a change within DEPLOYMENT_REFRESH_SECONDS. Changes are
recorded with `updated_by: "cli"`. Exit status 2 with a sentence on
stderr for invalid input, 3 when the store is unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from mnist_api.config import ConfigError, Settings
from mnist_api.deployment.manager import DeploymentManager
from mnist_api.errors import DeploymentStoreUnavailable, InvalidDeployment
from mnist_api.inference.registry import ModelRegistry
from mnist_api.storage import db

BY = "cli"


def _share(text: str) -> float:
    try:
        return float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"SHARE must be a number from 0 to 1, got {text!r}"
        ) from error


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(
        prog="python -m mnist_api.deployment.cli",
        description="Show or change which model version answers (the deployment).",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="the deployment in force")
    commands.add_parser("single", help="stable answers everything (drops the candidate)")
    for name, text in (
        ("shadow", "stable answers; VERSION also scores every request, off the answer"),
        ("bandit", "Thompson sampling between stable and VERSION from feedback"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("version")
    for name, text in (
        ("canary", "VERSION answers a random SHARE (0..1) of requests"),
        ("ab", "VERSION answers the keys whose hash falls below SHARE (sticky per key)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("version")
        command.add_argument("share", type=_share)
    commands.add_parser("promote", help="the candidate becomes stable (strategy single)")
    commands.add_parser("rollback", help="the previous stable comes back (strategy single)")
    history = commands.add_parser("history", help="the last changes, newest first")
    history.add_argument("limit", nargs="?", type=int, default=20)
    return top


def run(manager: DeploymentManager, args: argparse.Namespace) -> Any:
    """Carry out one parsed command; the JSON-ready result."""
    command = args.command
    if command == "status":
        return manager.describe(manager.current())
    if command == "history":
        return manager.history(max(1, min(args.limit, 100)))
    if command == "promote":
        return manager.describe(manager.promote(by=BY))
    if command == "rollback":
        return manager.describe(manager.rollback(by=BY))
    changes: dict[str, Any] = {"strategy": command}
    if command != "single":
        changes["candidate"] = args.version
    if command in ("canary", "ab"):
        changes["candidate_share"] = args.share
    return manager.describe(manager.apply(changes, by=BY, reason="manual"))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, print; the exit status."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        registry = ModelRegistry.discover(settings.models_dir)
        default = registry.default_version(settings.default_model_version)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manager = DeploymentManager.from_settings(settings, registry.versions(), default)
    try:
        if db.is_sqlite(settings.database_url):
            # The embedded file of `make run`: its gunicorn master migrates it the same way.
            db.upgrade(settings.database_url)
        result = run(manager, args)
    except InvalidDeployment as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except (DeploymentStoreUnavailable, SQLAlchemyError):
        print(
            f"error: the deployment store ({db.describe(settings.database_url)}) is "
            "unavailable; nothing was changed.",
            file=sys.stderr,
        )
        return 3
    finally:
        manager.store.dispose()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
