"""How the keep-alive worker reads a request before a thread serves it: the limits and
deadlines, the canned 408/431 answers, the deadline-aware unreader and one connection's
reading state.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from gunicorn.http.unreader import SocketUnreader

# How often a full worker with idle connections looks at the listen queue: a full worker
# stops watching the listener, so nothing else would wake it when a client arrives.
IDLE_CHECK_SECONDS = 0.05
# An idle connection is closed for a waiting client only after resting this long.
IDLE_GRACE_SECONDS = 0.1
# Longest request head (request line and header fields) the worker takes: 431 past it.
# Browsers and proxies send a few KiB; Heroku's router refuses header lines over 8 KiB.
MAX_HEAD_BYTES = 16 * 1024
# A body up to this size is read as it comes (every digit upload). A larger one first
# reserves its whole Content-Length in the worker's budget, GUNICORN_THREADS x
# MAX_CONTENT_LENGTH (what its threads could hold anyway), until its thread is done with it;
# one that does not fit waits, unread. Reservations never deadlock (each one can finish),
# and large bodies never take more memory than they did when threads read them.
SMALL_BODY_BYTES = 8 * 1024
# Most partial requests one worker holds; past it the oldest is closed. With the caps above:
# at most 128 x 24 KiB = 3 MiB of heads and small bodies per worker besides the budget,
# whatever the clients do.
MAX_PARTIAL_REQUESTS = 128
# A new connection that has sent nothing holds a connection slot this long at most (then it
# waits without one, until REQUEST_HEADER_TIMEOUT). Not the keep-alive time, which is 100 s
# behind Heroku's router: a client that connects sends its request at once.
SILENT_SLOT_SECONDS = 2.0
# How often the loop looks for requests past their deadline, and for room in the budget.
SWEEP_SECONDS = 0.1
# One read: a reserved body's, and everyone else's (never past the caps above by much).
RECV_BYTES = 64 * 1024
SMALL_RECV_BYTES = 8 * 1024
# How long a closing connection waits for the client's own close (RFC 9112 section 9.6), in
# the request's thread; gunicorn does it in the event loop, which stops the whole worker.
CLOSE_LINGER_SECONDS = 1.0

_TIMEOUT_BODY = json.dumps(
    {
        "error": "The request was not received in time; send it faster or in one go.",
        "code": "request_timeout",
    }
).encode()
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_TIMEOUT_BODY)
) + _TIMEOUT_BODY


_HEAD_BODY = json.dumps(
    {
        "error": f"The request head is over {MAX_HEAD_BYTES // 1024} KiB; send fewer or "
        "shorter header fields.",
        "code": "request_header_too_large",
    }
).encode()
HEAD_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_HEAD_BODY)
) + _HEAD_BODY


# What a thread returns for a request that is not all there: the event loop reads the rest.
INCOMPLETE = object()
# A chunked body (no Content-Length) is read by its thread, which it may hold until
# REQUEST_BODY_TIMEOUT: it reserves two bodies' worth of the budget, so that at most half
# of a worker's threads ever read one.
CHUNKED = -1


class RequestTimeout(BaseException):
    """The client did not send its request in time.

    A BaseException, so it goes through the app (Flask turns an Exception into a 500) back to
    the worker, which answers 408.
    """


class DeadlineUnreader(SocketUnreader):
    """gunicorn's socket reader: first the bytes the event loop read (in slices, as the
    socket would give them: one copy, never the whole rest of a body per read), then the
    socket, with a deadline on the whole request (not on each read)."""

    deadline: float = math.inf
    read_ahead: memoryview | None = None
    offset: int = 0

    def chunk(self, size_hint: int | None = None) -> bytes:
        """The next bytes; RequestTimeout once the deadline has passed."""
        size = self.mxchunk
        if size_hint and size_hint > size:
            size = min(size_hint, self.max_body_chunk)
        if self.read_ahead is not None:
            piece = bytes(self.read_ahead[self.offset : self.offset + size])
            self.offset += len(piece)
            if self.offset >= len(self.read_ahead):
                self.read_ahead = None
            return piece
        if self.deadline == math.inf:
            data: bytes = super().chunk(size_hint)
            return data
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout
        self.sock.settimeout(remaining)
        try:
            data = super().chunk(size_hint)
        except TimeoutError as error:
            raise RequestTimeout from error
        finally:
            self.sock.settimeout(None)
        return data

    def give(self, data: bytes | bytearray, deadline: float) -> None:
        """The next request's bytes read so far, and until when the rest may take."""
        self.read_ahead = memoryview(data) if data else None
        self.offset = 0
        self.deadline = deadline

    def keep_unread(self) -> None:
        """After an answer: bytes the loop read past this request (a pipelined one) go back
        into gunicorn's own buffer, where the worker looks for them."""
        if self.read_ahead is not None:
            rest = self.read_ahead[self.offset :]
            self.read_ahead = None
            self.buf.seek(0, 2)
            self.buf.write(rest)
        self.deadline = math.inf


@dataclass
class Reading:
    """A request the event loop is reading: its bytes so far and its deadline."""

    deadline: float
    silent_until: float  # a connection that sent nothing counts until then
    buffer: bytearray = field(default_factory=bytearray)
    head_end: int = -1  # where the body starts, once the head is in
    wanted: int = 0  # bytes to buffer before a thread takes over, once the head is in
    counted: bool = True  # counts against worker_connections (in nr_conns)
    registered: bool = False  # the poller watches it
    reserved: int = 0  # bytes of the worker's budget this body holds
    chunked: bool = False  # its body is chunked: read by the thread once reserved
    waiting: bool = False  # a large body waiting for room in the budget: not read meanwhile


def body_to_buffer(head: bytes, most: int) -> int | None:
    """The body length the event loop should read itself; CHUNKED; or None (over `most` or
    malformed: gunicorn's parser answers 400, the app 413, without waiting for the body)."""
    lowered = head.lower()
    if b"\r\ntransfer-encoding:" in lowered:
        return CHUNKED
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    end = lowered.find(b"\r\n", start + 2)
    value = lowered[start + 17 : end if end >= 0 else len(lowered)].strip()
    if not value.isdigit():
        return None
    length = int(value)
    return length if length <= most else None
