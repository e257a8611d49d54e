"""Deployments in one process (shared helpers: tests/deployment/helpers.py, fixtures:
tests/deployment/conftest.py): the choice per request (single, canary,
A/B, shadow, bandit) and the evidence it counts (routed answers, each (key, input) once).
"""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from apiflask import APIFlask

from mnist_api.deployment.manager import DeploymentManager
from mnist_api.deployment.router import DeploymentRouter
from mnist_api.deployment.value import ab_position
from mnist_api.extensions import DEPLOYMENTS, ROUTER
from tests.deployment.helpers import USER_HEADERS, manager_for, png_of

# --- the choice per request ---


KEYS = tuple(f"key{number}" for number in range(10))  # evidence needs EVIDENCE_MIN_KEYS (5)


def observe_many(
    router: DeploymentRouter, version: str, answers: int, low: int, keys: int = 10
) -> None:
    """`answers` routed answers of `version` (the first `low` low-confidence), each a new
    input, spread over `keys` keys as honest traffic would be."""
    for number in range(answers):
        client = KEYS[number % keys]
        router.observe(version, client, [(f"{version}-{number}", number < low)])


def routed(router: DeploymentRouter, client: str = "k", count: int = 1000) -> Counter[str]:
    return Counter(router.route(client).answer for _ in range(count))


def router_with(deployment_changes: dict[str, Any], seed: int = 1) -> DeploymentRouter:
    manager = manager_for()
    router = DeploymentRouter(manager, seed=seed)
    router.close()  # no background thread: the test drives `sync()` itself
    router.use(manager.apply(deployment_changes, by="test"))
    return router


def test_single_and_shadow_answer_from_stable() -> None:
    router = router_with({"strategy": "shadow", "candidate": "bbbbbbbbbbbb"})
    route = router.route("k")
    assert (route.answer, route.shadow) == ("aaaaaaaaaaaa", "bbbbbbbbbbbb")
    router.use(router.manager.apply({"strategy": "single"}, by="test"))
    assert router.route("k").shadow is None
    assert router.roles() == {"aaaaaaaaaaaa": "stable"}


def test_canary_gives_the_candidate_its_share() -> None:
    router = router_with(
        {"strategy": "canary", "candidate": "bbbbbbbbbbbb", "candidate_share": 0.3}
    )
    share = routed(router, count=5000)["bbbbbbbbbbbb"] / 5000
    assert 0.27 < share < 0.33


def test_ab_is_sticky_per_key_and_splits_keys_by_share() -> None:
    router = router_with({"strategy": "ab", "candidate": "bbbbbbbbbbbb", "candidate_share": 0.4})
    groups = {}
    for number in range(400):
        client = f"key{number:03d}"
        answers = routed(router, client, count=5)
        assert len(answers) == 1, f"{client} moved between versions"
        groups[client] = next(iter(answers))
        position = ab_position(client, router.deployment.id)
        assert groups[client] == ("bbbbbbbbbbbb" if position < 0.4 else "aaaaaaaaaaaa")
    share = sum(v == "bbbbbbbbbbbb" for v in groups.values()) / len(groups)
    assert 0.3 < share < 0.5
    # A new deployment (new id) draws the groups again.
    router.use(router.manager.apply({"candidate_share": 0.41}, by="test"))
    moved = sum(router.route(client).answer != version for client, version in groups.items())
    assert moved > 0


@pytest.mark.parametrize("better", ["stable", "candidate"])
def test_the_bandit_sends_most_traffic_to_the_better_version(better: str) -> None:
    router = router_with(
        {"strategy": "bandit", "candidate": "bbbbbbbbbbbb", "guard": {"enabled": False}},
        seed=7,
    )
    good = "aaaaaaaaaaaa" if better == "stable" else "bbbbbbbbbbbb"
    accuracy = {version: 0.6 for version in ("aaaaaaaaaaaa", "bbbbbbbbbbbb")}
    accuracy[good] = 0.95
    outcomes = random.Random(3)
    chosen = []
    for number in range(600):
        version = router.route("k").answer
        chosen.append(version)
        router.record_feedback(
            version, outcomes.random() < accuracy[version], client=KEYS[number % 10]
        )
        if number % 10 == 9:
            router.sync()  # the background loop's refresh: the posteriors learn from it
    late = Counter(chosen[-200:])
    assert late[good] / 200 > 0.8, late
    # ... but never starves the other below min_share (5%), give or take chance.
    assert late[next(v for v in accuracy if v != good)] >= 1
    router.sync()  # the counts go to the store and come back summed
    stats = router.manager.store.counts(router.deployment.id)
    assert sum(fields.get("feedback", 0) for fields in stats.values()) == 600


def test_the_bandit_keeps_min_share_for_each_version() -> None:
    router = router_with(
        {
            "strategy": "bandit",
            "candidate": "bbbbbbbbbbbb",
            "min_share": 0.2,
            "guard": {"enabled": False},
        }
    )
    for number in range(300):
        router.record_feedback("aaaaaaaaaaaa", True, client=KEYS[number % 10])
        router.record_feedback("bbbbbbbbbbbb", False, client=KEYS[number % 10])
    router.sync()
    share = routed(router, count=4000)["bbbbbbbbbbbb"] / 4000
    assert 0.17 < share < 0.23


# --- evidence (issue 21): routed answers only, each (key, input) once ---


def test_repeats_of_one_input_by_one_key_count_once() -> None:
    router = router_with({"strategy": "canary", "candidate": "bbbbbbbbbbbb"})
    for _ in range(5):
        router.observe("bbbbbbbbbbbb", "key0", [("digest-1", True), ("digest-1", True)])
    router.observe("bbbbbbbbbbbb", "key1", [("digest-1", True)])  # another key: new evidence
    router.sync()
    counts = router.manager.store.counts(router.deployment.id)
    assert counts["bbbbbbbbbbbb/key0"]["requests"] == 1
    assert counts["bbbbbbbbbbbb/key1"]["requests"] == 1


def test_pinned_answers_are_not_evidence(
    deploy_app: APIFlask, two_versions: tuple[Path, str, str]
) -> None:
    router: DeploymentRouter = deploy_app.extensions[ROUTER]
    manager: DeploymentManager = deploy_app.extensions[DEPLOYMENTS]
    bad = two_versions[2]
    # A fresh deployment id: the same document as an earlier test's would be a no-op change
    # that keeps that test's counts.
    router.use(manager.apply({"strategy": "single"}, by="t"))
    router.use(
        manager.apply({"strategy": "canary", "candidate": bad, "guard": {"enabled": False}}, by="t")
    )
    client = deploy_app.test_client()
    for digit in range(4):
        pinned = client.post(
            f"/predict?model_version={bad}",
            data={"file": (io.BytesIO(png_of(digit)), f"{digit}.png")},
            headers=USER_HEADERS,
        )
        assert pinned.status_code == 200
    router.sync()
    assert router.manager.store.counts(router.deployment.id) == {}
    routed = client.post(
        "/predict", data={"file": (io.BytesIO(png_of(5)), "5.png")}, headers=USER_HEADERS
    )
    assert routed.status_code == 200
    router.sync()
    counts = router.manager.store.counts(router.deployment.id)
    assert sum(fields.get("requests", 0) for fields in counts.values()) == 1
