"""How the router's counts are keyed and read per key, and the auto-promotion settings."""

from __future__ import annotations

import dataclasses

from mnist_api.deployment.store import Counts

KEY_SEPARATOR = "/"  # `<version>/<key fingerprint>` in the store's per-version counts


def per_key(counts: Counts) -> dict[str, dict[str, dict[str, int]]]:
    """`version -> key -> field -> count` from the store's `<version>/<key>` entries (counts
    stored before keys were tracked count as one key, "")."""
    result: dict[str, dict[str, dict[str, int]]] = {}
    for name, fields in counts.items():
        version, _, client = name.partition(KEY_SEPARATOR)
        target = result.setdefault(version, {}).setdefault(client, {})
        for field, count in fields.items():
            target[field] = target.get(field, 0) + count
    return result


@dataclasses.dataclass(frozen=True)
class AutoPromote:
    """AUTO_PROMOTE settings: off by default."""

    enabled: bool = False
    min_feedback: int = 200
    probability: float = 0.95
