"""The release gate a `make model` version must pass against stable, and the choice of the
stable version a fresh deployment starts with (`models/default_deployment.json`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mnist_api.config import PROJECT_ROOT
from mnist_api.inference.registry import DEFAULT_DEPLOYMENT_FILE, ModelRegistry
from training import release_gate
from training.default_stable import choose, gather

STABLE = {
    "accuracy_int8": 0.986,
    "user_style_accuracy": 0.991,
    "printed_accuracy": 1.0,
    "other_writers_accuracy": 0.96,
}


def gate(**new: float) -> dict[str, bool]:
    found = release_gate.checks({**STABLE, **new}, STABLE)
    return {check.name: check.passed for check in found}


def test_a_version_must_beat_stable_on_the_test_split() -> None:
    assert gate(accuracy_int8=0.987)["test split"]
    assert not gate()["test split"]  # a tie is not better


def test_the_other_sets_allow_half_a_point_and_no_more() -> None:
    passed = gate(accuracy_int8=0.99, user_style_accuracy=0.986, printed_accuracy=0.9951)
    assert all(passed.values())
    failed = gate(accuracy_int8=0.99, user_style_accuracy=0.985)
    assert not failed["user-style uploads"]


def test_other_writers_never_decide() -> None:
    # The UCI digits are evaluation only: however bad, they fail no gate.
    assert all(gate(accuracy_int8=0.99, other_writers_accuracy=0.10).values())
    assert "other writers" not in gate(accuracy_int8=0.99)


def entry(version: str, test: float, user: float, printed: float, uci: float) -> dict[str, Any]:
    return {
        "version": version,
        "metrics": {
            "test_accuracy": test,
            "user_style_accuracy": user,
            "printed_accuracy": printed,
            "other_writers_accuracy": uci,
        },
    }


def test_the_rule_ranks_the_test_split_first_then_the_deciding_sets_then_the_newer() -> None:
    assert choose([entry("a", 0.99, 0.9, 0.9, 0.9), entry("b", 0.98, 1, 1, 1)]) == "a"
    assert choose([entry("a", 0.99, 0.99, 1, 0.9), entry("b", 0.99, 0.98, 1, 1)]) == "a"
    assert choose([entry("a", 0.99, 0.99, 1, 0.9), entry("b", 0.99, 0.99, 1, 0.5)]) == "b"


def test_other_writers_never_choose_the_stable_version() -> None:
    older = entry("a", 0.99, 0.99, 1.0, 0.99)
    assert choose([older, entry("b", 0.99, 0.99, 1.0, 0.10)]) == "b"  # the newer, tie otherwise


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    """The committed decision file."""
    decision: dict[str, Any] = json.loads(
        (PROJECT_ROOT / "models" / DEFAULT_DEPLOYMENT_FILE).read_text()
    )
    return decision


def test_the_shipped_default_is_installed_and_starts_fresh_deployments(
    shipped: dict[str, Any],
) -> None:
    registry = ModelRegistry.discover(PROJECT_ROOT / "models")
    assert shipped["stable"] in registry
    assert registry.default_version() == shipped["stable"]
    assert {e["version"] for e in shipped["evidence"]} == set(registry.versions())


@pytest.mark.slow
def test_the_shipped_decision_is_what_the_evidence_says_today(shipped: dict[str, Any]) -> None:
    # Re-evaluated with today's code, every version scores what the file says, and the rule
    # applied to it picks the version the file names.
    evidence = gather(PROJECT_ROOT / "models")
    assert [e["metrics"] for e in evidence] == [e["metrics"] for e in shipped["evidence"]]
    assert choose(evidence) == shipped["stable"]
    # The figures next to the decision are the ones each version's card reports.
    for found in evidence:
        card = json.loads(
            (PROJECT_ROOT / "models" / found["version"] / "model_card.json").read_text()
        )
        for key, value in found["metrics"].items():
            card_key = "accuracy_int8" if key == "test_accuracy" else key
            assert card["metrics"][card_key] == pytest.approx(value, abs=0.0005), key
