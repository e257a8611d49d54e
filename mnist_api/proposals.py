"""A retrained version goes out as candidate: the one adapter to the deployment, and the
release step that uses it.

`training/retrain.py` installs a challenger that passed its gates under `models/<version>/`
and writes into its card what it asks for, e.g. `"proposed": {"strategy": "canary",
"candidate_share": 0.1}`. It then calls `propose_candidate` (for a local run), and the
Procfile's release phase runs `python -m mnist_api.proposals release` after a merge, which
calls `propose_candidate` for the newest proposed version not proposed before (remembered
in the database table `candidate_proposals`, so a later release does not do it again).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from loguru import logger
from sqlalchemy import insert, select
from sqlalchemy.exc import SQLAlchemyError

from mnist_api.config import Settings
from mnist_api.db import build_engine
from mnist_api.registry import CARD_FILE, ModelRegistry
from mnist_api.tables import candidate_proposals

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


def propose_candidate(proposal: Proposal, *, by: str, reason: str = "manual") -> Outcome:
    """THE adapter to the deployment (issue 12): start a canary or bandit on `proposal`.

    Wiring (for the integrator): this should call the deployment manager's
    `apply(proposal.changes(), by=by, reason=reason)` on the same store the web dynos read
    (Redis when REDIS_URL is set), e.g.

        manager = DeploymentManager.from_settings(Settings.from_env(), registry)
        manager.apply(proposal.changes(), by=by, reason=reason)
        return Outcome(True, f"{proposal.strategy} started on {proposal.version}")

    Until that manager is in this build, it runs the deployment CLI (`python -m
    mnist_api.deploy canary V SHARE` or `bandit V`) when the module exists, and otherwise
    applies nothing and says so (the proposal stays in the card for a later release).
    """
    if importlib.util.find_spec("mnist_api.deploy") is None:
        return Outcome(
            False,
            "no deployment manager in this build (mnist_api.deploy); the proposal stays in "
            "the model card for the next release",
        )
    args = [proposal.strategy, proposal.version]
    if proposal.strategy == "canary":
        args.append(str(proposal.candidate_share))
    done = subprocess.run(  # noqa: S603 - our own module, fixed arguments
        [sys.executable, "-m", "mnist_api.deploy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return Outcome(False, f"mnist_api.deploy {' '.join(args)} failed: {done.stderr[-300:]}")
    return Outcome(True, f"{proposal.strategy} started on {proposal.version} (by {by}, {reason})")


def stable_version(settings: Settings, registry: ModelRegistry) -> str:
    """The version the deployment holds as stable: what a challenger must beat.

    Wiring (for the integrator): return the deployment's `stable` (issue 12's store, Redis
    when REDIS_URL is set). Until then: DEFAULT_MODEL_VERSION, else the newest installed,
    which is what a fresh service starts on.
    """
    return registry.default_version(settings.default_model_version)


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
            outcome = propose_candidate(proposal, by=RELEASE_BY)
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
    """`python -m mnist_api.proposals release` (the Procfile's release phase)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["release"]:
        print("usage: python -m mnist_api.proposals release", file=sys.stderr)
        return 2
    return release(Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
