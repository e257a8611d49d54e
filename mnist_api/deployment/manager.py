"""Changing the deployment: what the admin routes, the CLI, the guard and other code call.

    manager = DeploymentManager.from_settings(settings, installed=registry.versions())
    manager.apply({"strategy": "canary", "candidate": "3f2a9c1b7d4e", "candidate_share": 0.1},
                  by="cli", reason="manual")
    manager.promote(by="cli")
    manager.rollback(by="cli")

Every change is validated first (`InvalidDeployment`, nothing written), then written with a
compare-and-set on the id it was based on. When another change wins the race, the change is
re-applied on top of the winner (and validated again), so each change lands whole or not at
all. A database failure raises `DeploymentStoreUnavailable` and changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from mnist_api.config import Settings
from mnist_api.deployment import value as rules
from mnist_api.deployment.store import DeploymentStore, build_deployment_store
from mnist_api.deployment.value import Deployment, GuardSettings
from mnist_api.errors import DeploymentStoreUnavailable

# How often a change is re-applied when other changes keep winning the race.
MAX_ATTEMPTS = 5


def guard_defaults(settings: Settings) -> GuardSettings:
    """The guard settings of the environment (GUARD_*)."""
    return GuardSettings(
        enabled=True,
        min_requests=settings.guard_min_requests,
        max_low_confidence_delta=settings.guard_max_low_confidence_delta,
        max_error_delta=settings.guard_max_error_delta,
        min_feedback=settings.guard_min_feedback,
        max_accuracy_drop=settings.guard_max_accuracy_drop,
    )


@dataclass
class DeploymentManager:
    """Reads and changes the deployment in its store; knows the installed versions."""

    store: DeploymentStore
    installed: tuple[str, ...]
    default_stable: str
    guard: GuardSettings = dataclasses.field(default_factory=GuardSettings)
    # Told of every change written (the Redis notification, when there is Redis).
    on_change: Callable[[Deployment], None] | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, installed: Collection[str], default_stable: str
    ) -> DeploymentManager:
        """A manager on the database DATABASE_URL names (or the embedded SQLite file)."""
        return cls(
            build_deployment_store(settings.database_url, settings.database_timeout_seconds),
            tuple(installed),
            default_stable,
            guard_defaults(settings),
        )

    def current(self) -> Deployment:
        """The deployment in force (the default `single` before the first change).

        `DeploymentStoreUnavailable` when the store cannot be read.
        """
        return self.store.load() or Deployment.initial(self.default_stable)

    def describe(self, deployment: Deployment) -> dict[str, Any]:
        """The contract's JSON shape of a deployment (`guard` with its effective values)."""
        public = deployment.to_dict(self.guard)
        public.pop("guard_overrides")
        return public

    def apply(
        self, changes: Mapping[str, Any], by: str, reason: str = "manual", detail: str = ""
    ) -> Deployment:
        """Set the fields in `changes` (the PUT body); the new deployment.

        `by` is who changes it (a key fingerprint, "cli", ...); `reason` one of
        manual|promote|rollback|guard|auto_promote. A change that changes nothing writes
        nothing and returns the current deployment.
        """
        return self._change(
            lambda current: rules.changed(current, changes, self.installed), by, reason, detail
        )

    def promote(self, by: str, reason: str = "promote", detail: str = "") -> Deployment:
        """The candidate becomes stable, strategy `single`; the new deployment."""
        return self._change(rules.promoted, by, reason, detail)

    def rollback(self, by: str, reason: str = "rollback", detail: str = "") -> Deployment:
        """The previous stable comes back, strategy `single` (see `deployment.rolled_back`)."""
        return self._change(
            lambda current: rules.rolled_back(current, self.installed), by, reason, detail
        )

    def replace_if_current(
        self, expected: Deployment, new: Deployment, by: str, reason: str, detail: str
    ) -> Deployment | None:
        """Write `new` only if `expected` is still in force (the guard's change: a decision
        taken on counts of one deployment must not undo a newer one). None when it was not.
        """
        stored = self.store.load()
        if (stored or Deployment.initial(self.default_stable)).id != expected.id:
            return None
        return self._write(stored.id if stored else "", new, by, reason, detail)

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The last `limit` changes, newest first: reason, detail, who, when, the deployment."""
        return self.store.history(limit)

    def _change(
        self, change: Callable[[Deployment], Deployment], by: str, reason: str, detail: str
    ) -> Deployment:
        if reason not in rules.REASONS:
            raise ValueError(f"reason must be one of {rules.REASONS}, got {reason!r}")
        for _ in range(MAX_ATTEMPTS):
            stored = self.store.load()
            current = stored or Deployment.initial(self.default_stable)
            new = change(current)
            if new.same_state(current) and new.previous_stable == current.previous_stable:
                return current
            written = self._write(stored.id if stored else "", new, by, reason, detail)
            if written is not None:
                return written
        raise DeploymentStoreUnavailable(
            "The deployment kept changing under this request; nothing was changed. Retry."
        )

    def _write(
        self, expected_id: str, new: Deployment, by: str, reason: str, detail: str
    ) -> Deployment | None:
        stamped = new.stamped(by)
        entry = {
            "reason": reason,
            "detail": detail,
            "updated_by": by,
            "updated_at": stamped.updated_at,
            "deployment": self.describe(stamped),
        }
        if not self.store.replace(expected_id, stamped, entry):
            return None
        if self.on_change is not None:
            self.on_change(stamped)
        return stamped
