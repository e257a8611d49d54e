"""gunicorn's threaded worker, keeping connections alive only while nobody waits to connect.

Keep-alive saves a TCP accept and a connection set-up per request (a quarter of a cached
answer's CPU here), but gunicorn's gthread worker keeps every connection it accepted, busy
or not, so a client's connections opened at once (wrk, a proxy's pool) could all stick to
one worker while the others idled. This worker holds at most `threads` connections (set
`worker_connections = threads`), so it never takes more than it can serve at once, and
gives a connection back instead of keeping it whenever another client is waiting in the
shared listen queue:

- after a response, if a connection is waiting to be accepted, the response says
  `Connection: close` (under overload every worker closes after each answer, and the
  kernel's queue hands the next connection to whichever worker is free: the fair queue
  the service had with keep-alive off);
- idle kept-alive connections that have rested a moment (0.1 s) are closed as soon as a new
  client waits and this worker has no free slot, so an idle browser cannot keep anyone
  waiting for the keep-alive timeout.
"""

from __future__ import annotations

import select
import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

# How often a full worker with idle connections looks at the listen queue: a full worker
# stops watching the listener, so nothing else would wake it when a client arrives.
IDLE_CHECK_SECONDS = 0.05
# An idle connection is closed for a waiting client only after resting this long.
IDLE_GRACE_SECONDS = 0.1


class KeepAliveWhenIdleWorker(ThreadWorker):
    """gthread with keep-alive that never makes a waiting client wait longer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gunicorn keeps at most `worker_connections - threads` idle connections; this
        # worker caps all its connections at `threads` instead, and any of them may idle.
        self.max_keepalived = self.cfg.threads

    def others_waiting(self) -> bool:
        """True if a connection waits in a listen queue this worker serves."""
        readable, _, _ = select.select(self.sockets, [], [], 0)
        return bool(readable)

    def handle_request(self, req: Any, conn: Any) -> Any:
        """Serve one request; ask for the connection to close if someone else is waiting."""
        if self.others_waiting():
            req.must_close = True  # gunicorn then answers with "Connection: close"
        return super().handle_request(req, conn)

    def murder_keepalived(self, force: bool = False) -> None:
        """Close expired idle connections, and, while a full worker keeps a new client
        waiting, those idle for longer than IDLE_GRACE_SECONDS."""
        if (
            not force
            and self.keepalived_conns
            and self.nr_conns >= self.worker_connections
            and self.others_waiting()
        ):
            # A busy client's connection is idle for a moment between its answer and its
            # next request: closing it then would drop the request it is sending. Idle for
            # longer, it is a client at rest (a browser). The oldest idle come first.
            rested = time.monotonic() + self.cfg.keepalive - IDLE_GRACE_SECONDS
            for conn in self.keepalived_conns:
                if conn.timeout > rested:
                    break
                conn.timeout = 0.0  # expired: gunicorn closes it below
        super().murder_keepalived(force)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Wait for events; a full worker holding idle connections wakes up often."""
        if self.keepalived_conns and self.nr_conns >= self.worker_connections:
            timeout = min(timeout, IDLE_CHECK_SECONDS)
        super().wait_for_and_dispatch_events(timeout)
