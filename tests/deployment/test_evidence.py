"""The evidence rules (mnist_api/deployment/evidence.py) and the bounds the docs state.

Bounds (docs/deployments.md): one key weighs at most EVIDENCE_MAX_SHARE_PER_KEY (s) of
any statistic, so against the same other evidence it moves a rate by at most s (k colluding
keys: k * s); fewer than EVIDENCE_MIN_KEYS keys decide nothing; the holdout accuracy gap
between two models moves by at most s per key.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from mnist_api.deployment.evidence import EvidenceRules, capped_rate, holdout_weights, key_cap
from mnist_api.deployment.guard import VersionStats, guard_verdict, promotion_verdict
from mnist_api.deployment.value import GuardSettings
from mnist_api.errors import InvalidPredictionId
from mnist_api.inference.prediction_ids import PredictionIds

RULES = EvidenceRules(max_share=0.2, min_keys=5)


def test_the_cap_holds_every_key_to_its_share() -> None:
    assert key_cap([100] * 5, 0.2) == 100  # five equal keys: 20% each, nobody capped
    assert key_cap([110, 1, 1, 1, 1], 0.2) == pytest.approx(1.0)  # the flood weighs as one
    assert key_cap([110], 0.2) == 0  # one key alone: no cap can hold, no evidence
    assert key_cap([10, 10, 10, 10], 0.2) == 0  # four keys cannot each be <= 20%
    rng = random.Random(5)
    for _ in range(300):
        counts = [rng.choice([1, 3, 10, 50, 1000]) for _ in range(rng.randint(5, 30))]
        cap = key_cap(counts, 0.2)
        weights = [min(n, cap) for n in counts]
        assert max(weights) <= 0.2 * sum(weights) + 1e-6


def test_fewer_keys_than_the_minimum_are_no_evidence() -> None:
    four = {f"k{i}": (100.0, 10.0) for i in range(4)}
    assert capped_rate(four, RULES) == (0.0, 0.0)
    five = {**four, "k4": (100.0, 10.0)}
    assert capped_rate(five, RULES) == (500.0, 50.0)


def rate(per_key: dict[str, tuple[float, float]]) -> float:
    weight, events = capped_rate(per_key, RULES)
    return events / weight


@pytest.mark.parametrize("colluding", [1, 2, 3])
def test_k_keys_move_a_rate_by_at_most_k_times_the_share(colluding: int) -> None:
    """Whatever volume and rate `colluding` keys send, each weighs at most 0.2 of the
    statistic: the rate moves by at most k * 0.2 from what the other keys' evidence says
    under the same cap."""
    rng = random.Random(colluding)
    for _ in range(200):
        honest = {}
        for number in range(rng.randint(5, 40)):
            n = float(rng.randint(1, 60))
            honest[f"h{number}"] = (n, float(rng.randint(0, int(n))))
        flood = {
            f"a{number}": (float(rng.choice([1, 100, 10_000])), 0.0) for number in range(colluding)
        }
        for bad in (0.0, 1.0):  # every answer low-confidence, or none
            attack = {key: (n, n * bad) for key, (n, _) in flood.items()}
            both = {**honest, **attack}
            weight, events = capped_rate(both, RULES)
            cap = key_cap([n for n, _ in both.values()], RULES.max_share)
            attackers = sum(min(n, cap) for n, _ in attack.values())
            assert attackers <= colluding * 0.2 * weight + 1e-6
            honest_weight = weight - attackers
            honest_events = events - sum(min(n, cap) * bad for n, _ in attack.values())
            rest = honest_events / honest_weight
            assert abs(events / weight - rest) <= colluding * 0.2 + 1e-9


def test_one_flooding_key_cannot_roll_back_or_promote() -> None:
    """The guard and auto-promotion on evidence: a key's 1,000 bad answers weigh like one
    honest key's, and without five keys nothing is judged at all."""
    guard = GuardSettings(min_requests=50, min_feedback=20)
    stable_keys = {f"h{i}": {"requests": 60, "low_confidence": 3} for i in range(6)}
    candidate_keys = {f"h{i}": {"requests": 60, "low_confidence": 3} for i in range(6)}
    stable = VersionStats.from_keys(stable_keys, RULES)
    alone = VersionStats.from_keys({"attacker": {"requests": 1000, "low_confidence": 1000}}, RULES)
    assert alone.requests == 0  # one key: no evidence
    assert guard_verdict(stable, alone, guard) is None
    flooded = VersionStats.from_keys(
        {**candidate_keys, "attacker": {"requests": 1000, "low_confidence": 1000}}, RULES
    )
    # 6 honest keys at 5% and one capped key at 100%: the candidate looks 0.2 * 0.95 worse
    # at most; with a margin of 0.25 that is no rollback.
    assert flooded.low_confidence / flooded.requests <= 0.05 + 0.2 * 0.95 + 1e-9
    assert guard_verdict(stable, flooded, GuardSettings(max_low_confidence_delta=0.25)) is None
    feedback = {"attacker": {"feedback": 112, "correct": 112}}
    lone = VersionStats.from_keys(feedback, RULES)
    assert promotion_verdict(VersionStats(feedback=300, correct=270), lone, 50, 0.95) is None


def test_the_holdout_caps_each_key() -> None:
    keys = ["flood"] * 500 + [f"h{i % 8}" for i in range(50)]
    weights = holdout_weights(keys, 0.2)
    per_row = np.array([weights[key] for key in keys])
    share = per_row[:500].sum() / per_row.sum()
    assert share == pytest.approx(0.2, abs=1e-6)
    # The flood's labels (all "wrong" for one model) move its accuracy by at most 0.2.
    right = np.array([0.0] * 500 + [1.0] * 50)
    assert 1.0 - np.average(right, weights=per_row) <= 0.2 + 1e-9


def test_prediction_ids_bind_key_input_and_time() -> None:
    ids = PredictionIds("secret", max_age_seconds=60)
    token = ids.issue(
        version="aaaaaaaaaaaa", deployment="d1", routed=True, client="k1", digest="0" * 32, now=1000
    )
    answered = ids.verify(token, "k1", now=1030)
    assert (answered.version, answered.deployment, answered.routed) == ("aaaaaaaaaaaa", "d1", True)
    assert "k1" not in token and "secret" not in token
    for bad_token, client, now in [
        (token, "k2", 1030),  # another key
        (token, "k1", 1061),  # expired
        (token.replace(".", "x."), "k1", 1030),
        (token + "A", "k1", 1030),
        ("", "k1", 1030),
        ("é." * 10, "k1", 1030),
        ("a" * 500, "k1", 1030),
    ]:
        with pytest.raises(InvalidPredictionId):
            ids.verify(bad_token, client, now=now)
    other = PredictionIds("another secret")
    with pytest.raises(InvalidPredictionId):
        other.verify(token, "k1", now=1030)
