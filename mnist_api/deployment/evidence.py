"""Evidence, not volume: how per-key counts become the statistics that decide (pure functions).

The guard, the bandit, auto-promotion and the retrain holdout read counts that callers
produce. One key can produce any volume, so each statistic is built from per-key counts
with two rules (README, "Evidence rules"):

- **a cap per key**: no key weighs more than `max_share` (EVIDENCE_MAX_SHARE_PER_KEY, 0.2)
  of the statistic. The cap `c` is the largest count with `c <= max_share * sum_k min(n_k, c)`;
  a key with more than `c` observations keeps its own rate but weighs `c`;
- **enough keys**: a statistic from fewer than `min_keys` distinct keys (EVIDENCE_MIN_KEYS, 5)
  is no evidence at all (its weight is 0). With fewer than 1/max_share keys no cap can hold
  either, so the effective minimum is max(min_keys, ceil(1/max_share)).

So one key moves a version's rate (low-confidence share, error rate, accuracy) by at most
`max_share` (k colluding keys: k * max_share), whatever it sends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Float slack: 0.2 * 5 keys of equal weight must count as "at most 20% each".
_EPSILON = 1e-9


@dataclass(frozen=True)
class EvidenceRules:
    """EVIDENCE_MAX_SHARE_PER_KEY and EVIDENCE_MIN_KEYS."""

    max_share: float = 0.2
    min_keys: int = 5


def key_cap(counts: Iterable[float], max_share: float) -> float:
    """The largest weight `c` a key may have so that none weighs over `max_share` of the total
    of the capped weights (`min(n_k, c)`); 0 when no such `c` exists (too few keys)."""
    ordered = sorted(count for count in counts if count > 0)
    if not ordered:
        return 0.0
    total = math.fsum(ordered)
    if ordered[-1] <= max_share * total + _EPSILON:
        return ordered[-1]  # nobody is over the cap
    size = len(ordered)
    for capped in range(1, size + 1):  # the `capped` largest keys weigh `c` each
        below = ordered[: size - capped]
        room = 1.0 - max_share * capped
        bound = max_share * math.fsum(below) / room if room > _EPSILON else math.inf
        cap = min(bound, ordered[size - capped])
        if cap > 0 and cap >= (below[-1] if below else 0.0) - _EPSILON:
            return cap
    return 0.0


def capped_rate(
    per_key: Mapping[str, tuple[float, float]], rules: EvidenceRules
) -> tuple[float, float]:
    """(weight, events) of one statistic from `key -> (observations, events)`, under the rules.

    Each key's events are scaled with its weight (`min(n_k, cap) / n_k`), so a capped key
    keeps its own rate. (0, 0) from fewer than `min_keys` keys.
    """
    present = {key: value for key, value in per_key.items() if value[0] > 0}
    if len(present) < rules.min_keys:
        return 0.0, 0.0
    cap = key_cap((n for n, _ in present.values()), rules.max_share)
    if cap <= 0:
        return 0.0, 0.0
    weight = events = 0.0
    for n, bad in present.values():
        kept = min(n, cap)
        weight += kept
        events += bad * kept / n
    return weight, events


def holdout_weights(keys: Iterable[str], max_share: float) -> dict[str, float]:
    """Per key, the weight of each of its rows in a holdout: 1, or less for a key over the cap
    (`cap / n_k`), so no key decides more than `max_share` of the score. A holdout from too
    few keys to cap keeps weight 1 everywhere (the caller decides whether it is enough)."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    cap = key_cap(counts.values(), max_share)
    if cap <= 0:
        return {key: 1.0 for key in counts}
    return {key: min(1.0, cap / n) for key, n in counts.items()}
