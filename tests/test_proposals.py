"""The release phase's candidate proposal: found in the cards, applied once, never failing.

`propose_candidate` is the one adapter to the deployment manager of issue 12. Where that
manager is not in the build, the adapter applies nothing; the recording and the "once"
rule are checked here with a stand-in adapter that reports success (the only stand-in:
the real manager is another module's part).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from mnist_api import db, proposals
from mnist_api.config import PROJECT_ROOT, Settings
from mnist_api.proposals import Outcome, Proposal, pending_proposal, release
from mnist_api.registry import ModelRegistry
from mnist_api.tables import candidate_proposals

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


def test_without_a_deployment_manager_nothing_is_applied_or_recorded(
    proposed: tuple[Settings, str], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, _ = proposed
    assert release(settings) == 0
    assert "no deployment manager" in capsys.readouterr().out
    assert recorded(settings) == []


def test_an_applied_proposal_is_recorded_and_not_repeated(
    proposed: tuple[Settings, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, version = proposed
    calls: list[tuple[Proposal, str]] = []

    def applied(proposal: Proposal, *, by: str, reason: str = "manual") -> Outcome:
        calls.append((proposal, by))
        return Outcome(True, f"bandit started on {proposal.version}")

    monkeypatch.setattr(proposals, "propose_candidate", applied)
    assert release(settings) == 0
    assert release(settings) == 0  # the next release does not start it again
    assert calls == [(Proposal(version, "bandit", 0.2), "release")]
    assert recorded(settings) == [(version, "bandit")]
    assert "was proposed before" in capsys.readouterr().out


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
