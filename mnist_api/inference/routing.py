"""Which version answers a request: a `Route` (answer, shadow, whether the deployment chose
it), the `Router` protocol the deployment implements, and `SingleRouter` for one version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Evidence = list[tuple[str, bool]]  # (input digest, low confidence) per answer


@dataclass(frozen=True)
class Route:
    """Which version answers a request, and which one (if any) scores it in the shadow.

    `routed` is False when the client pinned the version (`?model_version=`, a V2 version
    path): such answers are never evidence for the guard, the bandit or auto-promotion.
    `deployment` is the id of the deployment in force ("" without one).
    """

    answer: str
    shadow: str | None = None
    routed: bool = True
    deployment: str = ""


class Router(Protocol):
    """Decides per request which installed version answers (the deployment, issue 12)."""

    @property
    def stable(self) -> str:
        """The stable version's id."""

    def route(self, client: str) -> Route:
        """The route for a request from the key fingerprint `client` ("" without a key)."""

    @property
    def deployment_id(self) -> str:
        """The id of the deployment in force ("" when there is none)."""

    def roles(self) -> dict[str, str]:
        """`{version: "stable"|"candidate"}` for GET /models."""

    def observe(self, version: str, client: str, answers: Evidence, errors: int = 0) -> None:
        """Count routed answers of `version` to the key `client` ((input digest, low
        confidence) each) and failed inferences, for the guard; cheap, in-process."""

    def record_feedback(
        self, version: str, correct: bool, *, client: str = "", deployment: str = ""
    ) -> None:
        """Count one judged answer of `version` (feeds the bandit and the guard)."""


@dataclass
class SingleRouter:
    """The plain deployment: one version answers everything."""

    version: str

    @property
    def stable(self) -> str:
        """The one version."""
        return self.version

    @property
    def deployment_id(self) -> str:
        """No deployment object: ""."""
        return ""

    def route(self, client: str) -> Route:
        """Always the one version, no shadow."""
        return Route(self.version)

    def roles(self) -> dict[str, str]:
        """Only a stable version."""
        return {self.version: "stable"}

    def observe(self, version: str, client: str, answers: Evidence, errors: int = 0) -> None:
        """Nothing to guard with one version."""

    def record_feedback(
        self, version: str, correct: bool, *, client: str = "", deployment: str = ""
    ) -> None:
        """Nothing to learn with one version."""
