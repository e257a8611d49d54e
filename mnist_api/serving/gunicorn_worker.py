"""gunicorn's threaded worker: a thread never waits for a request's bytes (the event loop
does), and connections are kept alive only while nobody waits to connect.

**Slow clients.** A plain gthread worker hands a readable connection to a thread, which then
blocks reading the rest of the request: 8 sockets that sent half a request and stopped took
every thread of two 4-thread workers, and the service answered nobody. Here a thread reads
only what the socket already holds (without blocking): usually the whole request, which
came in one piece, and it serves it at once (the hot path costs what it did). An incomplete
request goes back to the event loop (its main thread), which reads the rest as it comes,
without blocking, and hands a thread the complete request. A client must send its head
within REQUEST_HEADER_TIMEOUT of connecting (or of its first byte on a kept-alive
connection) and its body within REQUEST_BODY_TIMEOUT more, or it gets 408 and is closed.
A connection that sent part of a request stops counting against the worker's connections
(below) until it is complete, so stalled clients never keep a complete one out. Memory
stays bounded: MAX_PARTIAL_REQUESTS partial requests per worker with a head of
MAX_HEAD_BYTES at most, and larger bodies within the memory their threads could hold anyway
(one that does not fit waits, unread). A chunked body (no Content-Length) is read by the
thread, under the same deadline.

**Fairness.** Keep-alive saves a TCP accept and a connection set-up per request (a quarter
of a cached answer's CPU here), but gunicorn's gthread worker keeps every connection it
accepted, busy or not, so a client's connections opened at once (wrk, a proxy's pool) could
all stick to one worker while the others idled. This worker holds at most `threads`
connections (set `worker_connections = threads`), so it never takes more than it can serve
at once, and gives a connection back instead of keeping it whenever another client is
waiting in the shared listen queue:

- after a response, if a connection is waiting to be accepted, the response says
  `Connection: close` (under overload every worker closes after each answer, and the
  kernel's queue hands the next connection to whichever worker is free: the fair queue
  the service had with keep-alive off);
- idle kept-alive connections that have rested a moment (0.1 s) are closed as soon as a new
  client waits and this worker has no free slot, so an idle browser cannot keep anyone
  waiting for the keep-alive timeout;
- a new connection that has sent nothing counts for SILENT_SLOT_SECONDS at most.

This class overrides gunicorn internals (`enqueue_req`, `handle`, `finish_request`,
`murder_keepalived`, `keepalived_conns`, `nr_conns`, the parser's `SocketUnreader`): gunicorn
is pinned (requirements.txt) and tests/serving/test_gunicorn_internals.py fails when what it relies
on changes.
"""

from __future__ import annotations

import contextlib
import math
import select
import selectors
import time
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import ThreadWorker

from mnist_api.config import Settings
from mnist_api.serving.request_reading import (
    CHUNKED,
    CLOSE_LINGER_SECONDS,
    HEAD_TOO_LARGE_RESPONSE,
    IDLE_CHECK_SECONDS,
    IDLE_GRACE_SECONDS,
    INCOMPLETE,
    MAX_HEAD_BYTES,
    MAX_PARTIAL_REQUESTS,
    RECV_BYTES,
    SILENT_SLOT_SECONDS,
    SMALL_BODY_BYTES,
    SMALL_RECV_BYTES,
    SWEEP_SECONDS,
    TIMEOUT_RESPONSE,
    DeadlineUnreader,
    Reading,
    RequestTimeout,
    body_to_buffer,
)


class KeepAliveWhenIdleWorker(ThreadWorker):
    """gthread that reads requests in its event loop, and keeps connections alive only when
    that never makes a waiting client wait longer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gunicorn keeps at most `worker_connections - threads` idle connections; this
        # worker caps all its connections at `threads` instead, and any of them may idle.
        self.max_keepalived = self.cfg.threads
        settings = Settings.from_env()
        self.header_timeout = settings.request_header_timeout
        self.body_timeout = settings.request_body_timeout
        self.max_body = settings.max_content_length
        # What the threads' bodies could hold at most anyway (README: memory per worker).
        self.buffer_budget = settings.threads * settings.max_content_length
        self.reserved = 0  # the budget's bytes that large bodies hold, in the loop or a thread
        self.reading: dict[Any, Reading] = {}
        self.partial = 0  # entries of self.reading that do not count in nr_conns
        self.next_sweep = 0.0

    # --- a thread reads what is there; the event loop waits for the rest --------------------

    def enqueue_req(self, conn: Any) -> None:
        """Hand a connection to a thread: with its request read by the event loop, or (a new
        connection, a kept-alive one that became readable, bytes left over from the previous
        request) for the thread to read what the socket holds, without waiting."""
        if getattr(conn, "read_ahead", None) is None:
            conn.read_ahead = None
        super().enqueue_req(conn)

    def first_read(self, conn: Any) -> Reading | None:
        """In the thread: what the connection holds now, without blocking (None: the client
        closed). Usually the whole request: it came in one piece."""
        now = time.monotonic()
        state = Reading(deadline=now + self.header_timeout, silent_until=now + SILENT_SLOT_SECONDS)
        if conn.parser is not None:  # a pipelined request may already be in the buffer
            state.buffer += conn.parser.unreader.take_buffered()
        if conn.sock.getblocking():  # the socket of the previous request's thread
            conn.sock.setblocking(False)
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return state
        except OSError:
            return None
        if not data:
            return None
        state.buffer += data
        return state

    def read_request(self, conn: Any) -> None:
        """In the event loop: read what the socket holds, without blocking; hand the request
        to a thread once complete."""
        state = self.reading[conn]
        try:
            data = conn.sock.recv(RECV_BYTES if state.reserved else SMALL_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(conn)
            return
        if not data:  # the client closed its side
            self.drop(conn)
            return
        state.buffer += data
        if self.request_ready(state, time.monotonic()):
            self.dispatch(conn)
        else:
            self.keep_reading(conn, state)

    def on_request_readable(self, conn: Any, _sock: Any) -> None:
        """The poller saw bytes (or a close) on a connection whose request is incomplete."""
        self.read_request(conn)

    def keep_reading(self, conn: Any, state: Reading) -> None:
        """An incomplete request: it gives back its connection slot once it has sent
        something, and waits in the loop (for its bytes, or for room in the budget)."""
        if state.buffer and state.counted and self.alive:
            state.counted = False
            self.nr_conns -= 1
            self.partial += 1
            if self.partial > MAX_PARTIAL_REQUESTS:
                self.drop_oldest_partial()
                if conn not in self.reading:  # it was this one
                    return
        if state.head_end < 0 and len(state.buffer) > MAX_HEAD_BYTES:
            self.drop(conn, HEAD_TOO_LARGE_RESPONSE)
        elif state.waiting:
            self.pause(conn, state)
        else:
            self.watch(conn, state)

    def watch(self, conn: Any, state: Reading) -> None:
        """Have the poller tell when more of this request arrives."""
        if not state.registered:
            self.poller.register(
                conn.sock, selectors.EVENT_READ, partial(self.on_request_readable, conn)
            )
            state.registered = True

    def pause(self, conn: Any, state: Reading) -> None:
        """Stop reading a body until its reservation fits (the client's TCP window fills;
        its deadline still runs)."""
        if state.registered:
            self.poller.unregister(conn.sock)
            state.registered = False

    def parse_head(self, state: Reading, now: float) -> None:
        """Once the head is in: where the body ends, and the body's own deadline."""
        if state.head_end >= 0:
            return
        end = state.buffer.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HEAD_BYTES:
            return
        state.head_end = end + 4
        length = body_to_buffer(bytes(state.buffer[:end]), self.max_body) or 0
        state.chunked = length == CHUNKED
        state.wanted = state.head_end + max(length, 0)
        state.deadline = now + self.body_timeout  # the body's own limit starts now

    def complete(self, state: Reading) -> bool:
        """Whether a thread can serve the request: its head and body are in (a chunked body:
        its reservation is made)."""
        ready = state.head_end >= 0 and len(state.buffer) >= state.wanted
        return ready and (not state.chunked or state.reserved > 0)

    def request_ready(self, state: Reading, now: float) -> bool:
        """In the event loop: whether the request is complete; a large body that is not
        gets its reservation (or waits for one)."""
        self.parse_head(state, now)
        if state.chunked and not state.reserved and not state.waiting:
            state.waiting = not self.reserve(state)
        if self.complete(state):
            return True
        large = state.head_end >= 0 and state.wanted - state.head_end > SMALL_BODY_BYTES
        if large and not state.reserved and not state.waiting:
            state.waiting = not self.reserve(state)
        return False

    def reserve(self, state: Reading) -> bool:
        """Give a large body its room in the budget, if it fits (then it is read)."""
        length = 2 * self.max_body if state.chunked else state.wanted - state.head_end
        if self.reserved + length > self.buffer_budget:
            return False
        self.reserved += length
        state.reserved = length
        state.waiting = False
        return True

    def forget(self, conn: Any) -> Reading:
        """Stop reading a request: its slot and poller entry are given back (its budget
        reservation only by the caller: a body in a thread still holds it)."""
        state = self.reading.pop(conn)
        if state.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
        if not state.counted:
            self.partial -= 1
            self.nr_conns += 1
        return state

    def dispatch(self, conn: Any) -> None:
        """Hand the request to the thread pool, with its bytes and its deadline."""
        state = self.forget(conn)  # counted again: finish_request uncounts it when it closes
        conn.reserved = state.reserved  # given back when the thread is done with the body
        conn.read_ahead = state.buffer  # no copy: the thread's reads slice it
        conn.read_deadline = state.deadline
        super().enqueue_req(conn)

    def drop(self, conn: Any, answer: bytes = b"") -> None:
        """Forget an incomplete request and close its connection (after `answer`, if any)."""
        self.reserved -= self.forget(conn).reserved
        self.nr_conns -= 1
        if answer:
            with contextlib.suppress(OSError):
                conn.sock.send(answer)  # a few hundred bytes: fits the empty send buffer
        util.close(conn.sock)

    def drop_oldest_partial(self) -> None:
        """Too many partial requests: the one that has been at it longest goes."""
        for conn, state in self.reading.items():
            if not state.counted:
                self.drop(conn, TIMEOUT_RESPONSE)
                return

    def sweep(self, now: float) -> None:
        """408 for requests past their deadline; silent connections stop holding a slot
        after SILENT_SLOT_SECONDS (and are closed then when the worker stops: a client may
        have connected just before, its request on the way), partial requests hold one again
        when it stops; large bodies get their reservation once there is room."""
        for conn, state in list(self.reading.items()):
            silent_too_long = not state.buffer and now >= state.silent_until
            if now >= state.deadline or (not self.alive and silent_too_long):
                self.drop(conn, TIMEOUT_RESPONSE if state.buffer else b"")
            elif not self.alive and state.buffer and not state.counted:
                # A stopping worker waits for the requests it has begun to receive (its
                # shutdown loop waits while nr_conns > 0, up to graceful_timeout).
                state.counted = True
                self.partial -= 1
                self.nr_conns += 1
            elif state.counted and now >= state.silent_until:
                state.counted = False
                self.nr_conns -= 1
                self.partial += 1
            elif state.waiting and self.reserve(state):  # in the order they came
                if self.complete(state):  # a chunked body: its thread reads it
                    self.dispatch(conn)
                else:
                    self.watch(conn, state)

    # --- a thread serves it ---------------------------------------------------------------

    def handle(self, conn: Any) -> Any:
        """Serve a request (runs in a thread): the one the event loop read, or the one the
        socket holds now; an incomplete one goes back to the event loop (INCOMPLETE)."""
        read_ahead, conn.read_ahead = conn.read_ahead, None
        conn.closed_here = False
        if read_ahead is None:
            state = self.first_read(conn)
            if state is None:
                util.close(conn.sock)
                conn.closed_here = True
                return False
            self.parse_head(state, time.monotonic())
            if not self.complete(state):
                conn.incomplete = state
                return INCOMPLETE
            read_ahead, conn.read_deadline = state.buffer, state.deadline
            del state
        conn.data_ready = True  # gunicorn must not wait for data: it is here
        try:
            conn.sock.setblocking(True)
            conn.init()
            unreader = conn.parser.unreader
            if type(unreader) is SocketUnreader:
                unreader.__class__ = DeadlineUnreader
            unreader.give(read_ahead, conn.read_deadline)
            del read_ahead  # the unreader lets go of a body once read: so must we
            keep_alive = super().handle(conn)
        except RequestTimeout:
            # Flask reads the body before it answers, so nothing was sent yet.
            try:
                conn.sock.settimeout(CLOSE_LINGER_SECONDS)
                conn.sock.sendall(TIMEOUT_RESPONSE)
            except OSError:
                pass
            keep_alive = False
        except OSError:
            keep_alive = False
        if not keep_alive:
            util.close_graceful(conn.sock, timeout=CLOSE_LINGER_SECONDS)
            conn.closed_here = True
        return keep_alive

    def handle_request(self, req: Any, conn: Any) -> Any:
        """Serve one request; ask for the connection to close if someone else is waiting."""
        if self.others_waiting():
            req.must_close = True  # gunicorn then answers with "Connection: close"
        try:
            return super().handle_request(req, conn)
        finally:
            # Answered: an unread body is drained within gunicorn's own bounds, and bytes
            # read past this request wait where gunicorn looks for a pipelined one.
            conn.parser.unreader.keep_unread()

    def finish_request(self, conn: Any, fs: Any) -> None:
        """Back in the event loop: the body's reservation is given back, and a connection
        the thread closed is only uncounted."""
        self.reserved -= getattr(conn, "reserved", 0)
        conn.reserved = 0
        if not fs.cancelled() and fs.exception() is None and fs.result() is INCOMPLETE:
            state, conn.incomplete = conn.incomplete, None
            self.reading[conn] = state
            if self.request_ready(state, time.monotonic()):  # a chunked body, reserved
                self.dispatch(conn)
            else:  # a large body gets its reservation (or waits for one)
                self.keep_reading(conn, state)
            return
        if getattr(conn, "closed_here", False):
            self.nr_conns -= 1
            return
        super().finish_request(conn, fs)

    # --- fairness -------------------------------------------------------------------------

    def others_waiting(self) -> bool:
        """True if a connection waits in a listen queue this worker serves."""
        readable, _, _ = select.select(self.sockets, [], [], 0)
        return bool(readable)

    def murder_keepalived(self, force: bool = False) -> None:
        """Close expired idle connections, and, while a full worker keeps a new client
        waiting, those idle for longer than IDLE_GRACE_SECONDS; time out slow requests."""
        now = time.monotonic()
        if self.reading and (now >= self.next_sweep or force or not self.alive):
            self.next_sweep = now + SWEEP_SECONDS
            self.sweep(math.inf if force else now)
        if (
            not force
            and self.keepalived_conns
            and self.nr_conns >= self.worker_connections
            and self.others_waiting()
        ):
            # A busy client's connection is idle for a moment between its answer and its
            # next request: closing it then would drop the request it is sending. Idle for
            # longer, it is a client at rest (a browser). The oldest idle come first.
            rested = now + self.cfg.keepalive - IDLE_GRACE_SECONDS
            for conn in self.keepalived_conns:
                if conn.timeout > rested:
                    break
                conn.timeout = 0.0  # expired: gunicorn closes it below
        super().murder_keepalived(force)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Wait for events; a full worker holding idle connections wakes up often."""
        if self.keepalived_conns and self.nr_conns >= self.worker_connections:
            timeout = min(timeout, IDLE_CHECK_SECONDS)
        if self.reading:
            timeout = min(timeout, SWEEP_SECONDS)
        super().wait_for_and_dispatch_events(timeout)
