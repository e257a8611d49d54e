"""A version built by `make model` against the stable one, before it is installed.

`quantize_model.py` evaluates the new int8 model and the stable version (the deployment in
force, read from the database as `training/retrain.py` does, or `--stable`) on the same
sets, and installs the new one only if it passes:

- the fixed test split: strictly better than stable (a rebuilt recipe has no feedback to
  show for itself, so it must win where both were measured the same way);
- user-style uploads and printed digits: not worse than stable by more than `TOLERANCE`
  (half a point) each.

Other writers (the UCI digits) are measured and written next to the verdict, but never
decide: they stay an evaluation-only, out-of-distribution figure, not something a version
is selected on.

A version that passes is marked in its card to be proposed as candidate (a 10% canary);
the release phase, or `--propose` at once, puts it out. The gates are written into the card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TOLERANCE = 0.005
OTHER_SETS = {"user_style": "user-style uploads", "printed": "printed digits"}


@dataclass(frozen=True)
class Check:
    """One rule the new version must pass against stable, and how it went."""

    name: str
    rule: str
    passed: bool
    detail: str


def checks(
    new: dict[str, Any], stable: dict[str, Any], tolerance: float = TOLERANCE
) -> list[Check]:
    """The gates, from the two versions' metrics (card keys: `accuracy_int8` for the test
    split, `<set>_accuracy` for the others), measured in the same run."""
    found = [
        Check(
            "test split",
            "better than stable",
            new["accuracy_int8"] > stable["accuracy_int8"],
            f"stable {stable['accuracy_int8']:.4f}, new {new['accuracy_int8']:.4f}",
        )
    ]
    for name, title in OTHER_SETS.items():
        key = f"{name}_accuracy"
        found.append(
            Check(
                title,
                f"not worse than stable by more than {tolerance * 100:.1f} pt",
                new[key] >= stable[key] - tolerance,
                f"stable {stable[key]:.4f}, new {new[key]:.4f}",
            )
        )
    return found


def card_entry(stable: str, found: list[Check], enforced: bool) -> dict[str, Any]:
    """What the card records under `release_gate`."""
    return {
        "stable": stable,
        "passed": all(check.passed for check in found),
        "enforced": enforced,
        "checks": [asdict(check) for check in found],
    }
