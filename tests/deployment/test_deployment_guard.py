"""Deployments in one process (shared helpers: tests/deployment/helpers.py, fixtures:
tests/deployment/conftest.py): the guard and auto-promotion.
"""

from __future__ import annotations

import random

from mnist_api import metrics
from mnist_api.deployment.counts import AutoPromote
from mnist_api.deployment.guard import (
    VersionStats,
    guard_verdict,
    probability_at_least_as_good,
    worse_beyond_margin,
)
from mnist_api.deployment.router import DeploymentRouter
from mnist_api.deployment.value import GuardSettings
from tests.deployment.test_deployment_routing import KEYS, observe_many, router_with

# --- the guard and auto-promotion ---


def test_the_z_test_needs_more_than_the_margin() -> None:
    assert not worse_beyond_margin(12, 100, 10, 100, 0.05)  # 2 points worse: within margin
    assert worse_beyond_margin(60, 100, 10, 100, 0.10)
    assert not worse_beyond_margin(4, 10, 1, 10, 0.10)  # worse, but too few to be sure
    assert worse_beyond_margin(100, 100, 0, 100, 0.10)  # no spread at all: certain
    assert not worse_beyond_margin(0, 0, 0, 100, 0.0)


def test_the_guard_waits_for_the_minimum_and_names_the_signal() -> None:
    settings = GuardSettings(min_requests=100, min_feedback=50)
    bad = VersionStats(requests=99, low_confidence=99)
    good = VersionStats(requests=500, low_confidence=20)
    assert guard_verdict(good, bad, settings) is None
    verdict = guard_verdict(good, VersionStats(requests=100, low_confidence=90), settings)
    assert verdict is not None and verdict.signal == "low_confidence"
    errors = guard_verdict(good, VersionStats(requests=80, errors=40), settings)
    assert errors is not None and errors.signal == "errors"
    wrong = guard_verdict(
        VersionStats(requests=10, feedback=60, correct=58),
        VersionStats(requests=10, feedback=60, correct=30),
        settings,
    )
    assert wrong is not None and wrong.signal == "accuracy"
    assert (
        guard_verdict(
            good, VersionStats(requests=100, low_confidence=90), GuardSettings(enabled=False)
        )
        is None
    )


def test_the_guard_rolls_back_once_with_a_reason() -> None:
    router = router_with(
        {"strategy": "canary", "candidate": "bbbbbbbbbbbb", "guard": {"min_requests": 50}}
    )
    before = router.deployment
    counter = metrics.GUARD_ROLLBACKS.labels(signal="low_confidence")
    rollbacks = counter._value.get()
    observe_many(router, "aaaaaaaaaaaa", 200, 10)
    observe_many(router, "mnist-cnn-int8-bbbbbbbbbbbb", 60, 50)
    router.sync()
    after = router.deployment
    assert (after.strategy, after.stable, after.candidate) == ("single", "aaaaaaaaaaaa", None)
    entry = router.manager.history(1)[0]
    assert entry["reason"] == "guard" and entry["updated_by"] == "guard"
    assert "low-confidence" in entry["detail"] and "60" in entry["detail"]
    assert counter._value.get() == rollbacks + 1
    # A second worker that decided on the same counts does not roll back twice.
    other = DeploymentRouter(router.manager)
    other.close()
    other.use(before)
    other._evidence = {
        "aaaaaaaaaaaa": VersionStats(requests=200),
        "bbbbbbbbbbbb": VersionStats(requests=60, low_confidence=50),
    }
    other._judge(before)
    assert len(router.manager.history(10)) == 2
    assert counter._value.get() == rollbacks + 1


def test_a_healthy_candidate_is_left_alone() -> None:
    router = router_with(
        {"strategy": "ab", "candidate": "bbbbbbbbbbbb", "guard": {"min_requests": 50}}
    )
    observe_many(router, "aaaaaaaaaaaa", 300, 15)
    observe_many(router, "bbbbbbbbbbbb", 300, 18)
    router.sync()
    assert router.deployment.strategy == "ab"


def test_auto_promotion_is_off_by_default_and_promotes_on_enough_feedback() -> None:
    router = router_with({"strategy": "bandit", "candidate": "bbbbbbbbbbbb"})
    for number in range(300):
        router.record_feedback("aaaaaaaaaaaa", random.random() < 0.9, client=KEYS[number % 10])
        router.record_feedback("bbbbbbbbbbbb", True, client=KEYS[number % 10])
    router.sync()
    assert router.deployment.strategy == "bandit"  # AUTO_PROMOTE is off
    router.auto_promote = AutoPromote(enabled=True, min_feedback=200, probability=0.95)
    router.sync()
    assert (router.deployment.strategy, router.deployment.stable) == ("single", "bbbbbbbbbbbb")
    entry = router.manager.history(1)[0]
    assert entry["reason"] == "auto_promote" and "P(candidate" in entry["detail"]
    assert router.deployment.previous_stable == "aaaaaaaaaaaa"


def test_promotion_probability_is_deterministic() -> None:
    good, worse = VersionStats(feedback=200, correct=190), VersionStats(feedback=200, correct=150)
    assert probability_at_least_as_good(worse, good) > 0.99
    assert probability_at_least_as_good(good, worse) < 0.01
    assert probability_at_least_as_good(worse, good) == probability_at_least_as_good(worse, good)
