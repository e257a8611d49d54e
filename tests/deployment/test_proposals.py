"""The release phase's candidate proposal: found in the cards, applied once, never failing.

`propose_candidate` is the one adapter to the deployment manager: it starts the canary or
bandit in the database (the store every web worker reads; no Redis needed). The retrain
gate's stable is the stable of the deployment stored there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from mnist_api.config import PROJECT_ROOT, Settings
from mnist_api.deployment import proposals
from mnist_api.deployment.proposals import Proposal, pending_proposal, release
from mnist_api.inference.registry import ModelRegistry
from mnist_api.storage import db
from mnist_api.storage.tables import candidate_proposals
from tools.services import free_port

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


def test_a_proposal_starts_the_candidate_in_the_database_once(
    proposed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, version = proposed
    assert not settings.redis_url
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
    manager.store.dispose()


def test_the_gate_stable_is_the_stable_in_force_after_a_promotion(
    proposed: tuple[Settings, str],
) -> None:
    """Issue 21: not "the newest version not marked proposed" (STABLE here) once an admin
    promoted the candidate, and without Redis as the scheduled workflow runs it."""
    settings, version = proposed
    registry = ModelRegistry.discover(settings.models_dir)
    assert registry.default_version() == STABLE
    manager = proposals._manager(settings)
    manager.apply({"strategy": "canary", "candidate": version}, by="t")
    manager.promote(by="t")
    manager.store.dispose()
    assert proposals.stable_version(settings, registry) == version


def test_the_gate_refuses_a_stable_it_cannot_know(
    proposed: tuple[Settings, str], tmp_path: Path
) -> None:
    settings, version = proposed
    down = settings.replace(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    with pytest.raises(proposals.StableUnknown, match="cannot be read"):
        proposals.stable_version(down, ModelRegistry.discover(settings.models_dir))
    manager = proposals._manager(settings)
    manager.apply({"strategy": "canary", "candidate": version}, by="t")
    manager.promote(by="t")
    manager.store.dispose()
    elsewhere = tmp_path / "only-stable"
    shutil.copytree(settings.models_dir / STABLE, elsewhere / STABLE)
    with pytest.raises(proposals.StableUnknown, match="not installed"):
        proposals.stable_version(settings, ModelRegistry.discover(elsewhere))


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


def test_a_proposed_version_chosen_as_default_is_stable_and_not_proposed_again(
    proposed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 25: a fresh deployment starts with the version `default_deployment.json` chose,
    even one whose card asks to be proposed; the release then has nothing to start."""
    settings, version = proposed
    (settings.models_dir / "default_deployment.json").write_text(json.dumps({"stable": version}))
    registry = ModelRegistry.discover(settings.models_dir)
    assert registry.default_version() == version
    assert release(settings) == 0
    assert "already the stable version" in capsys.readouterr().out
    manager = proposals._manager(settings)
    deployment = manager.current()
    assert (deployment.strategy, deployment.stable, deployment.candidate) == (
        "single",
        version,
        None,
    )
    manager.store.dispose()
    assert recorded(settings) == [(version, "bandit")]  # remembered: never tried again
