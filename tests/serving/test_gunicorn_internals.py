"""What mnist_api/serving/gunicorn_worker.py relies on inside gunicorn, checked against the
installed one.

The worker subclasses gthread's ThreadWorker and overrides methods gunicorn does not document
as an API. gunicorn is pinned (requirements.txt); when someone moves the pin, these tests say
which assumption to re-check, before a subtle failure in production does.
"""

from __future__ import annotations

import inspect
import re

import gunicorn
from gunicorn.http.unreader import SocketUnreader, Unreader
from gunicorn.workers import gthread

from mnist_api.config import PROJECT_ROOT
from mnist_api.serving.gunicorn_worker import KeepAliveWhenIdleWorker
from mnist_api.serving.request_reading import DeadlineUnreader


def source(function: object) -> str:
    return inspect.getsource(function)  # type: ignore[arg-type]


def test_gunicorn_is_the_pinned_version() -> None:
    pins = (PROJECT_ROOT / "requirements.txt").read_text()
    pinned = re.search(r"^gunicorn==(\S+)$", pins, re.MULTILINE)
    assert pinned, "gunicorn must be pinned with == in requirements.txt"
    assert gunicorn.__version__ == pinned.group(1)
    # The version the worker was written against: a new one needs the checks below re-read.
    assert gunicorn.__version__ == "27.0.1", (
        "gunicorn changed: re-read gthread.py against mnist_api/serving/gunicorn_worker.py, then "
        "update this version"
    )


def test_every_way_into_a_thread_goes_through_enqueue_req() -> None:
    """The worker reads requests in the event loop by overriding enqueue_req: every path
    that hands a connection to a thread must call it (and nothing else must submit)."""
    worker = gthread.ThreadWorker
    for name in ("accept", "on_client_socket_readable", "finish_request"):
        assert "self.enqueue_req(conn)" in source(getattr(worker, name)), name
    submits = [
        name
        for name, member in inspect.getmembers(worker, inspect.isfunction)
        if "tpool.submit" in source(member)
    ]
    assert submits == ["enqueue_req"]
    # A new connection is counted and handed over: nothing read from it yet.
    accept = source(worker.accept)
    assert "self.nr_conns += 1" in accept and "TConn(" in accept


def test_the_thread_side_hooks() -> None:
    """handle() skips its own wait when `data_ready` is set and builds the parser in
    conn.init(); finish_request looks for pipelined bytes in the unreader's buffer and
    uncounts a connection it closes; handle_request honours `must_close`."""
    handle = source(gthread.ThreadWorker.handle)
    assert "conn.data_ready" in handle and "conn.init()" in handle
    assert "next(conn.parser)" in handle
    finish = source(gthread.ThreadWorker.finish_request)
    assert "conn.parser.unreader.buf.getvalue()" in finish
    assert "self.nr_conns -= 1" in finish
    init = source(gthread.TConn.init)
    assert "self.initialized" in init and "http.get_parser" in init
    assert "if self.parser is None" in init


def test_the_event_loop_hooks() -> None:
    """run() gates accepting on nr_conns < worker_connections and calls murder_keepalived
    and wait_for_and_dispatch_events each turn; idle connections live in keepalived_conns."""
    run = source(gthread.ThreadWorker.run)
    assert "self.nr_conns < self.worker_connections" in run
    assert "self.murder_keepalived()" in run
    assert "self.wait_for_and_dispatch_events(" in run
    murder = source(gthread.ThreadWorker.murder_keepalived)
    assert "self.keepalived_conns" in murder and "conn.timeout" in murder
    assert "max_keepalived" in source(gthread.ThreadWorker.handle_request)


def test_the_unreader_the_worker_extends() -> None:
    """DeadlineUnreader replaces SocketUnreader.chunk and feeds Unreader.read/unread."""
    assert issubclass(DeadlineUnreader, SocketUnreader)
    assert list(inspect.signature(SocketUnreader.chunk).parameters) == ["self", "size_hint"]
    assert "self.sock.recv(size)" in source(SocketUnreader.chunk)
    assert "self.mxchunk" in source(SocketUnreader.chunk)
    assert isinstance(SocketUnreader.max_body_chunk, int)
    for name in ("read", "unread", "take_buffered"):
        assert callable(getattr(Unreader, name)), name
    assert "self.buf" in source(Unreader.read)
    # The parser reads through unreader.chunk only (so the deadline covers every read).
    assert "self.chunk(" in source(Unreader.read)


def test_the_worker_overrides_only_existing_methods() -> None:
    own = {
        name
        for name, member in vars(KeepAliveWhenIdleWorker).items()
        if inspect.isfunction(member) and not name.startswith("__")
    }
    ours = {
        "first_read",
        "keep_reading",
        "parse_head",
        "complete",
        "on_request_readable",
        "read_request",
        "watch",
        "pause",
        "request_ready",
        "reserve",
        "forget",
        "dispatch",
        "drop",
        "drop_oldest_partial",
        "sweep",
        "others_waiting",
    }
    for name in own - ours:
        assert hasattr(gthread.ThreadWorker, name), f"gunicorn has no ThreadWorker.{name}"
    for name in ours:
        assert not hasattr(gthread.ThreadWorker, name), f"gunicorn now has its own {name}"
