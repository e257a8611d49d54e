"""A circuit breaker for an optional dependency (Redis under the cache and the rate limiter).

After a failure the dependency is left alone for `retry_seconds` (callers take their
fallback at once), then the next call tries it again: an outage costs one timeout per retry
period instead of one per request, and service comes back by itself when the dependency does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def _ignore(*_args: object) -> None:
    return None


class Breaker:
    """Open after a failure for `retry_seconds`; reports the start and the end of an outage.

    `on_down(error)` runs once when an outage starts, `on_up(seconds_down)` once when the
    first call after it succeeds: one log line per incident, not one per request.
    """

    def __init__(
        self,
        retry_seconds: float,
        on_down: Callable[[Exception], None] = _ignore,
        on_up: Callable[[float], None] = _ignore,
    ) -> None:
        self.retry_seconds = retry_seconds
        self._on_down = on_down
        self._on_up = on_up
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    @property
    def down(self) -> bool:
        """True from a failure until the next success."""
        return self._down_since is not None

    def available(self) -> bool:
        """False while open (the dependency failed less than `retry_seconds` ago)."""
        return self._down_since is None or time.monotonic() >= self._retry_at

    def failed(self, error: Exception) -> None:
        """Record a failure: open (again) for `retry_seconds`."""
        with self._lock:
            first = self._down_since is None
            now = time.monotonic()
            if first:
                self._down_since = now
            self._retry_at = now + self.retry_seconds
        if first:
            self._on_down(error)

    def succeeded(self) -> None:
        """Record a success: closed; reports the end of an outage if one was going on."""
        if self._down_since is None:  # the common case: no lock on the hot path
            return
        with self._lock:
            down_since, self._down_since = self._down_since, None
        if down_since is not None:
            self._on_up(time.monotonic() - down_since)
