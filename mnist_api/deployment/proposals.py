"""A retrained version goes out as candidate: the one adapter to the deployment, and the
release step that uses it.

`training/retrain.py` installs a challenger that passed its gates under `models/<version>/`
and writes into its card what it asks for, e.g. `"proposed": {"strategy": "canary",
"candidate_share": 0.1}`. It then calls `propose_candidate` (for a local run), and the
Procfile's release phase runs `python -m mnist_api.deployment.proposals release` after a
merge, which
calls `propose_candidate` for the newest proposed version not proposed before (remembered
in the database table `candidate_proposals`, so a later release does not do it again).
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass
from typing import Any

from loguru import logger
from sqlalchemy import insert, select
from sqlalchemy.exc import SQLAlchemyError

from mnist_api.config import Settings
from mnist_api.deployment.manager import DeploymentManager
from mnist_api.errors import DeploymentStoreUnavailable, InvalidDeployment
from mnist_api.inference.registry import CARD_FILE, ModelRegistry
from mnist_api.storage import db
from mnist_api.storage.db import build_engine
from mnist_api.storage.tables import candidate_proposals

STRATEGIES = ("canary", "bandit")
RELEASE_BY = "release"  # who the deployment history names for a release-phase proposal


@dataclass(frozen=True)
class Proposal:
    """Put `version` out as candidate with `strategy` (canary: a `candidate_share` of traffic)."""

    version: str
    strategy: str = "canary"
    candidate_share: float = 0.1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0.0 < self.candidate_share < 1.0:
            raise ValueError(f"candidate_share must be in (0, 1), got {self.candidate_share}")

    def changes(self) -> dict[str, Any]:
        """The deployment change (the body of PUT /deployment) that starts the candidate."""
        return {
            "strategy": self.strategy,
            "candidate": self.version,
            "candidate_share": self.candidate_share,
        }

    def card_entry(self) -> dict[str, Any]:
        """What the model card records under "proposed"."""
        return {"strategy": self.strategy, "candidate_share": self.candidate_share}


@dataclass(frozen=True)
class Outcome:
    """Whether the deployment now has the candidate, and a sentence saying what happened."""

    applied: bool
    message: str


def propose_candidate(
    proposal: Proposal, settings: Settings, *, by: str, reason: str = "manual"
) -> Outcome:
    """Start a canary or bandit on `proposal` through the deployment manager (issue 12).

    The change goes to the database the web dynos read (DATABASE_URL, or the embedded
    SQLite file of a local run), so every worker takes it within DEPLOYMENT_REFRESH_SECONDS.
    A database that cannot be written leaves the proposal in the card: the next release
    tries again, or an admin starts it with `PUT /deployment`.
    """
    manager = _manager(settings)
    try:
        deployment = manager.apply(proposal.changes(), by=by, reason=reason)
    except (InvalidDeployment, DeploymentStoreUnavailable) as error:
        return Outcome(False, f"the deployment was not changed: {error.message}")
    finally:
        manager.store.dispose()
    return Outcome(
        True,
        f"{deployment.strategy} started on {proposal.version} (deployment {deployment.id}, "
        f"by {by})",
    )


class StableUnknown(RuntimeError):
    """The deployment in force cannot be read, or names a stable version not installed
    here: a challenger cannot be gated against it (the message says what to do)."""


def stable_version(settings: Settings, registry: ModelRegistry) -> str:
    """The version the deployment in force holds as stable: what a challenger must beat.

    Read from the database the service stores its deployment in (DATABASE_URL, else the
    embedded SQLite file, migrated first as `make run` does), so CI and a local run gate
    against the same version the service serves. Before the first change that is the
    first-start default (DEFAULT_MODEL_VERSION, else models/default_deployment.json's
    choice, else the newest settled version).
    `StableUnknown` when the database cannot be read or its stable is not installed here:
    gating against another version would be gating against the wrong model.
    """
    default = registry.default_version(settings.default_model_version)
    if db.is_sqlite(settings.database_url):
        db.upgrade(settings.database_url)  # idempotent; a fresh clone has no file yet
    manager = _manager(settings)
    try:
        stable = manager.current().stable
    except DeploymentStoreUnavailable as error:
        raise StableUnknown(
            f"the deployment in force cannot be read from {db.describe(settings.database_url)} "
            "(is it reachable and migrated? `python -m mnist_api.db upgrade`); pass "
            "--stable VERSION to gate against a version you choose"
        ) from error
    finally:
        manager.store.dispose()
    if stable not in registry:
        raise StableUnknown(
            f"the deployment's stable version {stable} is not installed in "
            f"{registry.models_dir} (default would be {default}); install it or pass --stable"
        )
    return stable


def _is_stable(version: str, settings: Settings) -> bool:
    """True when the deployment in force already serves `version` as stable."""
    manager = _manager(settings)
    try:
        return manager.current().stable == version
    except DeploymentStoreUnavailable:
        return False  # propose_candidate will say the database cannot be written
    finally:
        manager.store.dispose()


def _manager(settings: Settings) -> DeploymentManager:
    registry = ModelRegistry.discover(settings.models_dir)
    return DeploymentManager.from_settings(
        settings, registry.versions(), registry.default_version(settings.default_model_version)
    )


def pending_proposal(registry: ModelRegistry) -> Proposal | None:
    """The newest installed version whose card asks to be proposed, or None."""
    for version in reversed(registry.versions()):
        card = _card(registry, version)
        entry = card.get("proposed")
        if isinstance(entry, dict):
            return Proposal(
                version,
                str(entry.get("strategy", "canary")),
                float(entry.get("candidate_share", 0.1)),
            )
    return None


def _card(registry: ModelRegistry, version: str) -> dict[str, Any]:
    try:
        card = json.loads((registry.models_dir / version / CARD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def release(settings: Settings) -> int:
    """The release phase's step: propose the newest proposed version once. Always exits 0.

    A proposal that cannot be applied never fails the release: the new code and models
    still deploy, stable keeps answering, and the next release tries again.
    """
    registry = ModelRegistry.discover(settings.models_dir)
    proposal = pending_proposal(registry)
    if proposal is None:
        print("candidate proposal: no installed version asks to be proposed")
        return 0
    engine = build_engine(settings.database_url, timeout=10.0)
    try:
        with engine.begin() as connection:
            done = connection.execute(
                select(candidate_proposals.c.outcome).where(
                    candidate_proposals.c.version == proposal.version
                )
            ).scalar_one_or_none()
            if done is not None:
                print(f"candidate proposal: {proposal.version} was proposed before ({done})")
                return 0
            if _is_stable(proposal.version, settings):
                # A fresh deployment starts with the chosen default (models/
                # default_deployment.json) as stable: that version needs no canary.
                outcome = Outcome(True, f"{proposal.version} is already the stable version")
            else:
                outcome = propose_candidate(proposal, settings, by=RELEASE_BY)
            print(f"candidate proposal: {outcome.message}")
            if outcome.applied:
                connection.execute(
                    insert(candidate_proposals).values(
                        version=proposal.version,
                        strategy=proposal.strategy,
                        candidate_share=proposal.candidate_share,
                        outcome=outcome.message[:200],
                        proposed_at=datetime.datetime.now(datetime.UTC),
                    )
                )
    except SQLAlchemyError as error:
        logger.error("candidate proposal skipped, database unavailable: {}", type(error).__name__)
    finally:
        engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mnist_api.deployment.proposals release` (the Procfile's release phase)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["release"]:
        print("usage: python -m mnist_api.deployment.proposals release", file=sys.stderr)
        return 2
    return release(Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
