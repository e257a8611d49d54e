"""The deployment value: which installed version is stable, which is the candidate, and how
traffic is shared between them (single, shadow, canary, ab, bandit).

A `Deployment` is immutable; every change makes a new one with a new `id`, so an id names
one exact state (the A/B groups hash it, the guard's counts are kept per id, and the store
writes a change only if the id it was based on is still current). `changed()` validates a
change against the installed versions and raises `InvalidDeployment` with a sentence that
says what is wrong; nothing is written unless it passes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mnist_api.errors import InvalidDeployment
from mnist_api.inference.registry import short_version

STRATEGIES = ("single", "shadow", "canary", "ab", "bandit")
# Strategies in which a candidate takes real traffic: the ones the guard watches.
GUARDED = ("canary", "ab", "bandit")
REASONS = ("manual", "promote", "rollback", "guard", "auto_promote")
FIELDS = ("strategy", "stable", "candidate", "candidate_share", "min_share", "guard")
DEFAULT_SHARE = 0.1
DEFAULT_MIN_SHARE = 0.05


@dataclass(frozen=True)
class GuardSettings:
    """When the guard rolls a candidate back (see mnist_api/deployment/guard.py for the rule)."""

    enabled: bool = True
    min_requests: int = 200
    max_low_confidence_delta: float = 0.10
    max_error_delta: float = 0.02
    min_feedback: int = 50
    max_accuracy_drop: float = 0.05

    def updated(self, overrides: Mapping[str, Any]) -> GuardSettings:
        """These settings with `overrides` (already validated) applied."""
        return dataclasses.replace(self, **dict(overrides))


GUARD_FIELDS = {f.name: f.type for f in dataclasses.fields(GuardSettings)}


@dataclass(frozen=True)
class Deployment:
    """One state of the deployment. `guard` holds only the settings changed by an admin:
    the rest come from the environment (GUARD_*), so changing those takes effect."""

    stable: str
    strategy: str = "single"
    candidate: str | None = None
    candidate_share: float = DEFAULT_SHARE
    min_share: float = DEFAULT_MIN_SHARE
    guard: dict[str, Any] = field(default_factory=dict)
    # The stable version before the last promotion, so a rollback can bring it back.
    previous_stable: str | None = None
    id: str = ""
    updated_at: str = ""
    updated_by: str = ""

    @classmethod
    def initial(cls, stable: str) -> Deployment:
        """The deployment before anyone changed it: `single` on `stable`.

        Its id is derived from the version, so every worker and dyno that starts without a
        stored deployment agrees on it.
        """
        digest = hashlib.sha256(f"initial:{stable}".encode()).hexdigest()[:12]
        return cls(stable=stable, id=digest, updated_by="default")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        """A deployment read back from the store (written by `to_dict`)."""
        return cls(
            stable=str(data["stable"]),
            strategy=str(data.get("strategy", "single")),
            candidate=data.get("candidate") or None,
            candidate_share=float(data.get("candidate_share", DEFAULT_SHARE)),
            min_share=float(data.get("min_share", DEFAULT_MIN_SHARE)),
            guard=dict(data.get("guard_overrides") or {}),
            previous_stable=data.get("previous_stable") or None,
            id=str(data.get("id", "")),
            updated_at=str(data.get("updated_at", "")),
            updated_by=str(data.get("updated_by", "")),
        )

    def to_dict(self, guard_defaults: GuardSettings | None = None) -> dict[str, Any]:
        """The contract's shape (`guard` with every effective setting), plus what the store
        needs to rebuild this value (`guard_overrides`, `previous_stable`)."""
        guard = (guard_defaults or GuardSettings()).updated(self.guard)
        return {
            "id": self.id,
            "strategy": self.strategy,
            "stable": self.stable,
            "candidate": self.candidate,
            "candidate_share": self.candidate_share,
            "min_share": self.min_share,
            "guard": dataclasses.asdict(guard),
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
            "previous_stable": self.previous_stable,
            "guard_overrides": dict(self.guard),
        }

    def effective_guard(self, defaults: GuardSettings) -> GuardSettings:
        """The guard settings in force: the defaults with this deployment's overrides."""
        return defaults.updated(self.guard)

    def same_state(self, other: Deployment) -> bool:
        """True when `other` routes traffic exactly like this one (ids and stamps aside)."""
        keys = ("stable", "strategy", "candidate", "candidate_share", "min_share", "guard")
        return all(getattr(self, key) == getattr(other, key) for key in keys)

    def stamped(self, by: str) -> Deployment:
        """This state with a new id, now, and who changed it."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return dataclasses.replace(self, id=uuid.uuid4().hex[:12], updated_at=now, updated_by=by)


def changed(
    current: Deployment, changes: Mapping[str, Any], installed: Collection[str]
) -> Deployment:
    """`current` with `changes` (the PUT body) applied and checked; not yet stamped.

    Versions may be given in short or full form and are stored short. Switching to `single`
    drops the candidate. `InvalidDeployment` says what is wrong; nothing is changed then.
    """
    if not isinstance(changes, Mapping):
        raise InvalidDeployment("Send a JSON object with the fields to change.")
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise InvalidDeployment(
            f"Unknown field {unknown[0]!r}; the fields are: {', '.join(FIELDS)}."
        )
    values: dict[str, Any] = {}
    if "strategy" in changes:
        strategy = changes["strategy"]
        if strategy not in STRATEGIES:
            raise InvalidDeployment(
                f"Unknown strategy {strategy!r}; use one of: {', '.join(STRATEGIES)}."
            )
        values["strategy"] = strategy
    for name in ("stable", "candidate"):
        if name in changes:
            values[name] = _version(name, changes[name], installed)
    for name in ("candidate_share", "min_share"):
        if name in changes:
            values[name] = _share(name, changes[name])
    if "guard" in changes:
        values["guard"] = {**current.guard, **_guard(changes["guard"])}
    result = dataclasses.replace(current, **values)
    if result.strategy == "single":
        result = dataclasses.replace(result, candidate=None)
    check(result, installed)
    return result


def check(deployment: Deployment, installed: Collection[str]) -> None:
    """Refuse a deployment that cannot be served; `InvalidDeployment` says why."""
    if deployment.stable not in installed:
        raise InvalidDeployment(
            f"Stable version {deployment.stable!r} is not installed; GET /models lists them."
        )
    if deployment.strategy != "single":
        if deployment.candidate is None:
            raise InvalidDeployment(
                f"Strategy {deployment.strategy!r} needs a candidate version; set 'candidate'."
            )
        if deployment.candidate == deployment.stable:
            raise InvalidDeployment(
                "The candidate is the stable version; choose another version as candidate."
            )
    if deployment.min_share > 0.5:
        raise InvalidDeployment(
            "min_share must be at most 0.5: both versions are guaranteed that share."
        )


def promoted(current: Deployment) -> Deployment:
    """The candidate becomes stable, strategy `single`; the old stable is remembered."""
    if current.candidate is None:
        raise InvalidDeployment("There is no candidate to promote; set one with PUT first.")
    return dataclasses.replace(
        current,
        stable=current.candidate,
        candidate=None,
        strategy="single",
        previous_stable=current.stable,
    )


def rolled_back(current: Deployment, installed: Collection[str]) -> Deployment:
    """The previous stable comes back (strategy `single`); without one, an experiment in
    progress ends (`single` on the current stable). A second rollback undoes the first."""
    previous = current.previous_stable
    if previous is not None and previous in installed and previous != current.stable:
        return dataclasses.replace(
            current,
            stable=previous,
            candidate=None,
            strategy="single",
            previous_stable=current.stable,
        )
    if current.strategy != "single":
        return dataclasses.replace(current, candidate=None, strategy="single")
    raise InvalidDeployment(
        "There is nothing to roll back to: no earlier stable version is known and no "
        "candidate is deployed."
    )


def ab_position(client: str, deployment_id: str) -> float:
    """Where a key falls in [0, 1) for the A/B split: a hash of its fingerprint and the
    deployment id, so a key keeps its group while the deployment holds."""
    digest = hashlib.sha256(f"{client}:{deployment_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _version(name: str, value: Any, installed: Collection[str]) -> str | None:
    if value is None and name == "candidate":
        return None
    if not isinstance(value, str) or not value:
        raise InvalidDeployment(f"'{name}' must be an installed model version id.")
    version = short_version(value)
    if version not in installed:
        raise InvalidDeployment(
            f"Version {value!r} ({name}) is not installed; GET /models lists the versions."
        )
    return version


def _share(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidDeployment(f"'{name}' must be a number from 0 to 1, got {value!r}.")
    return float(value)


def _guard(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidDeployment("'guard' must be an object, e.g. {\"enabled\": false}.")
    result: dict[str, Any] = {}
    for key, item in value.items():
        kind = GUARD_FIELDS.get(key)
        if kind is None:
            raise InvalidDeployment(
                f"Unknown guard setting {key!r}; they are: {', '.join(GUARD_FIELDS)}."
            )
        if kind == "bool":
            if not isinstance(item, bool):
                raise InvalidDeployment(f"guard '{key}' must be true or false.")
        elif kind == "int":
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise InvalidDeployment(f"guard '{key}' must be a whole number of at least 1.")
        elif isinstance(item, bool) or not isinstance(item, int | float) or not 0 <= item <= 1:
            raise InvalidDeployment(f"guard '{key}' must be a number from 0 to 1.")
        result[key] = float(item) if kind == "float" else item
    return result
