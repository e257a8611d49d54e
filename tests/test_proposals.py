"""The release phase's candidate proposal: found in the cards, applied once, never failing.

`propose_candidate` is the one adapter to the deployment manager: with a real redis-server
it starts the canary or bandit there (the store every web worker reads); without Redis it
applies nothing and says how to start it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from mnist_api import db, proposals
from mnist_api.config import PROJECT_ROOT, Settings
from mnist_api.proposals import Proposal, pending_proposal, release
from mnist_api.registry import ModelRegistry
from mnist_api.tables import candidate_proposals
from tools.redis_server import RedisServer

STABLE = "fe5e4f4d480b"


@pytest.fixture
def proposed(tmp_path: Path) -> tuple[Settings, str]:
    """A models folder with stable and a copy of it posing as a newer, proposed version."""
    models = tmp_path / "models"
    shutil.copytree(PROJECT_ROOT / "models" / STABLE, models / STABLE)
    # Same file, so not a valid release (the release check would refuse the folder name);
    # enough for what is read here: the cards.
    newer = models / "0123456789ab"
    shutil.copytree(models / STABLE, newer)
    card = json.loads((newer / "model_card.json").read_text())
    card["created"] = "2099-01-01T00:00:00+00:00"
    card["proposed"] = {"strategy": "bandit", "candidate_share": 0.2}
    (newer / "model_card.json").write_text(json.dumps(card))
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    db.upgrade(url)
    return Settings(models_dir=models, database_url=url), newer.name


def test_the_newest_proposed_card_is_found(proposed: tuple[Settings, str]) -> None:
    settings, version = proposed
    registry = ModelRegistry.discover(settings.models_dir)
    assert pending_proposal(registry) == Proposal(version, "bandit", 0.2)
    assert Proposal(version, "bandit", 0.2).changes() == {
        "strategy": "bandit",
        "candidate": version,
        "candidate_share": 0.2,
    }


def test_without_redis_nothing_is_applied_or_recorded(
    proposed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _ = proposed
    assert release(settings) == 0
    assert "PUT /deployment" in capsys.readouterr().out
    assert recorded(settings) == []


def test_a_proposal_starts_the_candidate_in_redis_once(
    proposed: tuple[Settings, str],
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, version = proposed
    settings = settings.replace(redis_url=redis_server.url)
    assert release(settings) == 0
    manager = proposals._manager(settings)
    deployment = manager.current()
    assert (deployment.strategy, deployment.stable, deployment.candidate) == (
        "bandit",
        STABLE,
        version,
    )
    assert manager.history(1)[0]["updated_by"] == "release"
    assert proposals.stable_version(settings, ModelRegistry.discover(settings.models_dir)) == (
        STABLE
    )
    assert release(settings) == 0  # the next release does not start it again
    assert manager.current().id == deployment.id
    assert recorded(settings) == [(version, "bandit")]
    assert "was proposed before" in capsys.readouterr().out


def test_a_proposed_version_is_not_the_default_stable(proposed: tuple[Settings, str]) -> None:
    settings, version = proposed
    registry = ModelRegistry.discover(settings.models_dir)
    assert registry.newest == version
    assert registry.default_version() == STABLE


def test_a_database_down_never_fails_the_release(
    proposed: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, _ = proposed
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    broken = settings.replace(database_url=f"sqlite:///{blocker / 'x.db'}")
    assert release(broken) == 0


def test_a_bad_proposal_is_refused() -> None:
    with pytest.raises(ValueError, match="strategy"):
        Proposal(STABLE, "shadow", 0.1)
    with pytest.raises(ValueError, match="candidate_share"):
        Proposal(STABLE, "canary", 1.5)


def recorded(settings: Settings) -> list[tuple[str, str]]:
    engine = db.build_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(candidate_proposals.c.version, candidate_proposals.c.strategy)
            ).all()
    finally:
        engine.dispose()
    return [(row[0], row[1]) for row in rows]
