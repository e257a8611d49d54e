"""The statistics behind the guard, the bandit and auto-promotion (pure functions).

Guard rule (under canary, ab and bandit): for each signal, the candidate's rate of bad
outcomes p_c is compared with stable's p_s: low-confidence answers per answer, failed
inferences per attempt, wrong answers per feedback. The candidate is rolled back when
p_c - p_s exceeds the signal's margin with 95% confidence: a one-sided two-proportion
z-test, z = (p_c - p_s - margin) / sqrt(p_c(1-p_c)/n_c + p_s(1-p_s)/n_s) > 1.645, judged
only once both versions have at least `min_requests` answers (`min_feedback` feedback for
accuracy). A margin keeps a tiny but real difference from costing a good candidate.

Bandit: Thompson sampling. Each version's accuracy has a Beta(correct + 1, incorrect + 1)
posterior from feedback; a request goes to the version whose sampled accuracy is higher,
except that a `min_share` of requests is reserved for each version, so neither starves.

Auto-promotion: with at least `min_feedback` feedback per version, the candidate is
promoted when P(accuracy_candidate >= accuracy_stable) >= `probability` under those
posteriors, estimated by Monte Carlo (20,000 draws, fixed seed: the same counts always give
the same decision).

Every count here is evidence (mnist_api/deployment/evidence.py): routed answers only, each
(key, input) once, each key capped at EVIDENCE_MAX_SHARE_PER_KEY of the statistic, and
nothing from fewer than EVIDENCE_MIN_KEYS keys; so the counts are weights (floats), not raw
request counts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mnist_api.deployment.evidence import EvidenceRules, capped_rate
from mnist_api.deployment.value import GuardSettings

Z_95_ONE_SIDED = 1.645
MONTE_CARLO_DRAWS = 20_000


@dataclass(frozen=True)
class VersionStats:
    """What one version did under one deployment, summed over every worker (as evidence)."""

    requests: float = 0  # answers given (cache hits included)
    low_confidence: float = 0  # answers below LOW_CONFIDENCE_THRESHOLD
    errors: float = 0  # uploads whose inference raised
    feedback: float = 0
    correct: float = 0
    # Answers plus failed inferences, when capped on its own (None: requests + errors).
    attempts: float | None = None

    @classmethod
    def from_counts(cls, counts: Mapping[str, float]) -> VersionStats:
        """From a `field -> count` mapping of one version (missing fields are 0), uncapped."""
        names = ("requests", "low_confidence", "errors", "feedback", "correct")
        return cls(**{name: float(counts.get(name, 0)) for name in names})

    @classmethod
    def from_keys(
        cls, per_key: Mapping[str, Mapping[str, float]], rules: EvidenceRules
    ) -> VersionStats:
        """From `key fingerprint -> field -> count` of one version, each statistic capped per
        key and void below the minimum number of keys (mnist_api/deployment/evidence.py)."""

        def field(counts: Mapping[str, float], name: str) -> float:
            return float(counts.get(name, 0))

        requests, low = capped_rate(
            {k: (field(c, "requests"), field(c, "low_confidence")) for k, c in per_key.items()},
            rules,
        )
        attempts, errors = capped_rate(
            {
                k: (field(c, "requests") + field(c, "errors"), field(c, "errors"))
                for k, c in per_key.items()
            },
            rules,
        )
        feedback, incorrect = capped_rate(
            {
                k: (field(c, "feedback"), field(c, "feedback") - field(c, "correct"))
                for k, c in per_key.items()
            },
            rules,
        )
        return cls(requests, low, errors, feedback, feedback - incorrect, attempts)

    @property
    def tried(self) -> float:
        """Inference attempts: the weight of the error-rate statistic."""
        return self.requests + self.errors if self.attempts is None else self.attempts

    @property
    def incorrect(self) -> float:
        """Feedback that said the answer was wrong."""
        return self.feedback - self.correct


@dataclass(frozen=True)
class Verdict:
    """Why the guard (or auto-promotion) acts: which signal, in a sentence."""

    signal: str  # low_confidence | errors | accuracy | feedback
    detail: str


def worse_beyond_margin(bad_c: float, n_c: float, bad_s: float, n_s: float, margin: float) -> bool:
    """True when the candidate's bad rate exceeds stable's by more than `margin`, with 95%
    confidence (the one-sided z-test of the module docstring)."""
    if n_c <= 0 or n_s <= 0:
        return False
    p_c, p_s = bad_c / n_c, bad_s / n_s
    excess = p_c - p_s - margin
    if excess <= 0:
        return False
    spread = math.sqrt(p_c * (1 - p_c) / n_c + p_s * (1 - p_s) / n_s)
    return spread == 0 or excess / spread > Z_95_ONE_SIDED


def guard_verdict(
    stable: VersionStats, candidate: VersionStats, settings: GuardSettings
) -> Verdict | None:
    """The reason to roll the candidate back, or None while it is not measurably worse."""
    if not settings.enabled:
        return None
    enough = min(candidate.requests, stable.requests) >= settings.min_requests
    if enough and worse_beyond_margin(
        candidate.low_confidence,
        candidate.requests,
        stable.low_confidence,
        stable.requests,
        settings.max_low_confidence_delta,
    ):
        low_c = _rate(candidate.low_confidence, candidate.requests)
        return Verdict(
            "low_confidence",
            f"low-confidence answers: candidate {low_c}"
            f" vs stable {_rate(stable.low_confidence, stable.requests)}, more than "
            f"{settings.max_low_confidence_delta:.0%} worse (one-sided z-test, 95%)",
        )
    tried_c, tried_s = candidate.tried, stable.tried
    if min(tried_c, tried_s) >= settings.min_requests and worse_beyond_margin(
        candidate.errors, tried_c, stable.errors, tried_s, settings.max_error_delta
    ):
        return Verdict(
            "errors",
            f"inference errors: candidate {_rate(candidate.errors, tried_c)} vs stable "
            f"{_rate(stable.errors, tried_s)}, more than {settings.max_error_delta:.0%} worse "
            "(one-sided z-test, 95%)",
        )
    if min(candidate.feedback, stable.feedback) >= settings.min_feedback and worse_beyond_margin(
        candidate.incorrect,
        candidate.feedback,
        stable.incorrect,
        stable.feedback,
        settings.max_accuracy_drop,
    ):
        return Verdict(
            "accuracy",
            f"feedback accuracy: candidate {_rate(candidate.correct, candidate.feedback)} vs "
            f"stable {_rate(stable.correct, stable.feedback)}, more than "
            f"{settings.max_accuracy_drop:.0%} lower (one-sided z-test, 95%)",
        )
    return None


def thompson_picks_candidate(
    rng: random.Random, stable: VersionStats, candidate: VersionStats, min_share: float
) -> bool:
    """One bandit decision: True sends the request to the candidate."""
    draw = rng.random()
    if draw < min_share:
        return False
    if draw < 2 * min_share:
        return True
    sampled_c = rng.betavariate(candidate.correct + 1, candidate.incorrect + 1)
    sampled_s = rng.betavariate(stable.correct + 1, stable.incorrect + 1)
    return sampled_c > sampled_s


def probability_at_least_as_good(stable: VersionStats, candidate: VersionStats) -> float:
    """P(accuracy_candidate >= accuracy_stable) under the Beta posteriors (Monte Carlo)."""
    rng = np.random.default_rng(0)
    c = rng.beta(candidate.correct + 1, candidate.incorrect + 1, MONTE_CARLO_DRAWS)
    s = rng.beta(stable.correct + 1, stable.incorrect + 1, MONTE_CARLO_DRAWS)
    return float(np.mean(c >= s))


def promotion_verdict(
    stable: VersionStats, candidate: VersionStats, min_feedback: int, probability: float
) -> Verdict | None:
    """The reason to promote the candidate by itself, or None without enough evidence."""
    if min(stable.feedback, candidate.feedback) < min_feedback:
        return None
    chance = probability_at_least_as_good(stable, candidate)
    if chance < probability:
        return None
    return Verdict(
        "feedback",
        f"feedback accuracy: candidate {_rate(candidate.correct, candidate.feedback)} vs stable "
        f"{_rate(stable.correct, stable.feedback)}; P(candidate at least as good) = "
        f"{chance:.3f} >= {probability}",
    )


def _rate(count: float, total: float) -> str:
    # Capped evidence is fractional; one decimal says so without noise.
    return f"{_number(count)}/{_number(total)} ({count / total:.1%})" if total else "0/0"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
