"""A small, bounded load generator for the load and fault tests (loopback only).

Each of `concurrency` threads keeps one HTTP connection and sends requests drawn from a
traffic mix until the time is up or the request budget is spent, checking every answer
against the status its kind of request must get.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests


@dataclass(frozen=True)
class Shot:
    """One kind of request: what to send and the status it must get back.

    `expected` may name several statuses (a large upload: 200, or 503 with `Retry-After`
    when the worker's decode budget is full).
    """

    name: str
    expected: int | tuple[int, ...]
    body: Callable[[int], bytes]  # request number -> body (e.g. a unique nonce per miss)
    content_type: str = "image/png"
    key_ok: bool = True
    weight: int = 1
    path: str = "/predict"  # e.g. the Open Inference Protocol's /v2/models/mnist/infer
    headers: tuple[tuple[str, str], ...] = ()  # more request headers


@dataclass
class LoadResult:
    """What happened: counts per kind and status, and everything that went wrong."""

    sent: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_shot: Counter[str] = field(default_factory=Counter)
    connection_errors: int = 0
    unexpected: list[str] = field(default_factory=list)
    seconds: float = 0.0
    busy: int = 0  # 503s with Retry-After where the shot allows them (decode budget full)
    # (when it was sent, on time.monotonic(); how long its answer took), per answered request
    timings: list[tuple[float, float]] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        """Responses with a 5xx status, other than the allowed "busy, retry" ones."""
        errors = sum(count for status, count in self.by_status.items() if status >= 500)
        return errors - self.busy

    @property
    def failures(self) -> int:
        """Requests that did not get the answer they must get (connection errors included)."""
        return len(self.unexpected)


def run_load(
    url: str,
    api_key: str,
    shots: Sequence[Shot],
    *,
    seconds: float,
    concurrency: int,
    max_requests: int = 1_000_000,
    seed: int = 0,
) -> LoadResult:
    """Drive `url` + each shot's path with the mix for `seconds`; never more than
    `max_requests`."""
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    weights = [shot.weight for shot in shots]
    counter = iter(range(max_requests))

    def next_number() -> int | None:
        with lock:
            return next(counter, None)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        session = requests.Session()
        while time.monotonic() < deadline:
            number = next_number()
            if number is None:
                return
            shot = rng.choices(shots, weights)[0]
            headers = {
                "Content-Type": shot.content_type,
                "x-api-key": api_key if shot.key_ok else "wrong-key",
                **dict(shot.headers),
            }
            body = shot.body(number)
            sent_at = time.monotonic()
            try:
                response = session.post(f"{url}{shot.path}", data=body, headers=headers, timeout=15)
            except requests.RequestException as error:
                session = requests.Session()  # the connection died with its worker
                with lock:
                    result.sent += 1
                    result.connection_errors += 1
                    result.unexpected.append(f"{shot.name}: {type(error).__name__}")
                continue
            answered_in = time.monotonic() - sent_at
            status = response.status_code
            accepted = shot.expected if isinstance(shot.expected, tuple) else (shot.expected,)
            busy = status == 503 and status in accepted
            told_to_retry = (
                busy
                and bool(response.headers.get("Retry-After"))
                and (response.json().get("code") == "server_busy")
            )
            with lock:
                result.sent += 1
                result.timings.append((sent_at, answered_in))
                result.by_status[status] += 1
                result.by_shot[shot.name] += 1
                if status not in accepted:
                    result.unexpected.append(f"{shot.name}: {status}")
                elif busy and not told_to_retry:
                    result.unexpected.append(f"{shot.name}: 503 not server_busy + Retry-After")
                if busy:
                    result.busy += 1

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


def run_slow_clients(
    url: str,
    api_key: str,
    body: bytes,
    *,
    seconds: float,
    concurrency: int,
    header_timeout: float,
    body_timeout: float,
    seed: int = 0,
) -> LoadResult:
    """Slow clients for `seconds`, each on its own connection, in turns:

    - `slow_in_time`: a valid /predict of `body` (a PNG) sent in four pieces 0.2 s apart: 200;
    - `stalled_head`: half a request head, then nothing: 408 (or a bare close) once
      `header_timeout` has passed;
    - `stalled_body`: a whole head and half the body: 408 once `body_timeout` has passed.
    """
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    address = urlsplit(url)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {address.hostname}\r\nx-api-key: {api_key}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    kinds = {
        "slow_in_time": ([head[:25], head[25:], body[:40], body[40:]], 0.2, 200),
        "stalled_head": ([head[:30]], header_timeout, 408),
        "stalled_body": ([head + body[:40]], body_timeout, 408),
    }

    def one(name: str) -> str | None:
        pieces, limit, expected = kinds[name]
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sent_at = time.monotonic()
            for piece in pieces:
                sock.sendall(piece)
                if expected == 200:
                    time.sleep(limit)
            sock.settimeout(limit + 5)
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
                    if expected == 200 and b"\r\n\r\n" in answer:
                        break
            except ConnectionResetError:
                pass
            took = time.monotonic() - sent_at
        with lock:
            result.timings.append((sent_at, took))
        if expected == 408 and answer == b"" and limit - 0.5 <= took <= limit + 2:
            return None  # closed without an answer: allowed
        if not answer.startswith(f"HTTP/1.1 {expected} ".encode()):
            return f"{name}: {answer[:40]!r} after {took:.1f} s"
        if expected == 408 and not limit - 0.5 <= took <= limit + 2:
            return f"{name}: 408 after {took:.1f} s, limit {limit} s"
        return None

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < deadline:
            name = rng.choice(list(kinds))
            try:
                problem = one(name)
            except OSError as error:
                problem = f"{name}: {type(error).__name__}"
            with lock:
                result.sent += 1
                result.by_shot[name] += 1
                if problem:
                    result.unexpected.append(problem)
                    result.connection_errors += "Error" in problem

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


def percentile(values: Sequence[float], share: float) -> float:
    """The value below which `share` (0-1) of `values` fall (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise LookupError(f"no {field} for {pid}")


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """The most resident memory the process has had (`VmHWM`), since start or the last reset."""
    return _status_kib(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Restart a process's peak counter from its current size (Linux: /proc/PID/clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
