"""A per-process memory budget that image decodes reserve bytes from before they start.

One gunicorn worker runs several requests at once in threads. Each decode first states what
it will cost (estimated from the image header, see `mnist_api.decode_cost`) and reserves
that many bytes here; a decode that does not fit waits for others to finish, up to a short
deadline, and then gives up with `Overloaded` (503 and `Retry-After`), so a burst of large
uploads queues or is turned away instead of pushing the worker past its memory. One upload
that would cost more than the whole budget can never fit and is refused at once with
`ImageTooLarge` (413).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mnist_api.errors import ImageTooLarge, Overloaded

MIB = 1024 * 1024


class DecodeBudget:
    """Bytes that the decodes running in this process may hold at once (thread-safe)."""

    def __init__(self, capacity_bytes: int, wait_seconds: float) -> None:
        if capacity_bytes <= 0:
            raise ValueError("a decode budget needs a positive capacity")
        self.capacity = capacity_bytes
        self.wait_seconds = max(0.0, wait_seconds)
        self._in_use = 0
        self._waiting = 0
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        with self._changed:
            return self._in_use

    @property
    def waiting(self) -> int:
        """Decodes waiting for room right now."""
        with self._changed:
            return self._waiting

    def retry_after(self) -> str:
        """The `Retry-After` value (whole seconds) a client turned away should wait."""
        return str(max(1, math.ceil(self.wait_seconds)))

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold `cost` bytes for the duration of the block; released even if it raises.

        Raises `ImageTooLarge` if `cost` exceeds the whole budget, and `Overloaded` if the
        bytes did not become free within `wait_seconds`.
        """
        cost = max(0, cost)
        if cost > self.capacity:
            raise ImageTooLarge(
                f"Decoding this image would need about {math.ceil(cost / MIB)} MiB of memory; "
                f"the server allows {self.capacity // MIB} MiB per worker. Send fewer pixels "
                "(or a JPEG)."
            )
        deadline = time.monotonic() + self.wait_seconds
        with self._changed:
            self._waiting += 1
            try:
                while self._in_use + cost > self.capacity:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Overloaded(headers={"Retry-After": self.retry_after()})
                    self._changed.wait(remaining)
            finally:
                self._waiting -= 1
            self._in_use += cost
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= cost
                # Every waiter re-checks: the freed bytes may fit a small decode but not a big one.
                self._changed.notify_all()
