"""Score a folder or a zip of images into a CSV: `python -m mnist_api.jobs.bulk INPUT --out FILE`.

With `REDIS_URL` set, chunks of images are fanned out to the Celery workers (so adding
worker machines makes it faster), at most `--max-in-flight` chunks at a time so Redis never
holds more than a few chunks of the folder; without it, or with `--local`, they are scored
here. Every file gets one row; a file that is not a usable image gets its error code, never
a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, states
from kombu.exceptions import KombuError, OperationalError
from redis import RedisError
from tqdm import tqdm

from mnist_api.config import Settings
from mnist_api.errors import (
    BrokerUnavailable,
    DeadLettered,
    QueueFull,
    ServiceError,
)
from mnist_api.imaging.digest import upload_sha256
from mnist_api.inference.cache import build_cache
from mnist_api.inference.service import PredictionService
from mnist_api.jobs.bulk_inputs import Item, read_items
from mnist_api.jobs.celery_app import PREDICT_UPLOADS, celery_config
from mnist_api.jobs.store import build_job_store, cost
from mnist_api.logs import configure_logging

COLUMNS = ("file", "prediction", "probability", "error_code")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
TASK_FAILED = "task_failed"
TASK_TIMEOUT = "task_timeout"
WHY = {
    TASK_FAILED: "The worker could not score this image's chunk.",
    TASK_TIMEOUT: "No worker answered for this image's chunk in time (--timeout).",
    QueueFull.code: "Redis held too many waiting uploads for too long (--timeout).",
    BrokerUnavailable.code: "Redis could not be reached to queue or read this chunk.",
    DeadLettered.code: "Every worker process that took this image's chunk died; it was given up.",
}
# Seconds between tries while other clients' uploads fill the queue's byte budget.
QUEUE_FULL_PAUSE = 1.0
# What can go wrong while talking to the broker or the result backend.
_BROKER_ERRORS = (OperationalError, KombuError, RedisError, ConnectionError, OSError, TimeoutError)


def row(name: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """A CSV row from a task outcome ({"result": ...} or {"error", "code"})."""
    cell = spreadsheet_safe(name)
    if "result" in outcome:
        result = outcome["result"]
        return {
            "file": cell,
            "prediction": result["prediccion"],
            "probability": result["probabilidad"],
            "error_code": "",
        }
    return {"file": cell, "prediction": "", "probability": "", "error_code": outcome["code"]}


def spreadsheet_safe(text: str) -> str:
    """`text` as a CSV cell that a spreadsheet shows and never runs.

    Excel, LibreOffice and Google Sheets treat a cell starting with = + - @ (or a tab or
    carriage return before one) as a formula: a file named `=HYPERLINK(...).png` would run
    when the CSV is opened. A leading apostrophe makes it text (OWASP's "CSV injection").
    """
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def outcome_of(answer: dict[str, Any] | ServiceError) -> dict[str, Any]:
    """The service's answer (or error) in the shape the worker tasks return."""
    return answer.to_dict() if isinstance(answer, ServiceError) else {"result": answer}


def chunks(items: Iterator[Item], size: int, max_bytes: int | None = None) -> Iterator[list[Item]]:
    """Consecutive lists of at most `size` items costing (but for a lone item) `max_bytes`.

    An image costs what holding it in Redis counts against the queue's budget.
    """
    chunk: list[Item] = []
    weight = 0
    for item in items:
        item_bytes = cost(item.data) if item.data is not None else 0
        if chunk and (
            len(chunk) == size or (max_bytes is not None and weight + item_bytes > max_bytes)
        ):
            yield chunk
            chunk, weight = [], 0
        chunk.append(item)
        weight += item_bytes
    if chunk:
        yield chunk


def score_locally(
    settings: Settings, items: Iterator[Item], size: int, progress: tqdm[Any]
) -> Iterator[dict[str, Any]]:
    """Score in this process: one model call per chunk, through the same cache."""
    service = PredictionService.from_settings(settings, build_cache(settings))
    for chunk in chunks(items, size):
        readable = [item.data for item in chunk if item.data is not None]
        answers = iter(service.predict_many(readable))
        for item in chunk:
            outcome = item.error.to_dict() if item.error else outcome_of(next(answers))
            progress.update(1)
            yield row(item.name, outcome)


@dataclass
class Submitted:
    """A chunk handed to the workers: its task id, or the code of why it could not be."""

    chunk: list[Item]
    hashes: list[str]
    task_id: str | None = None
    error_code: str | None = None


class WorkerScorer:
    """Fans chunks out to the Celery workers, keeping at most `max_in_flight` in Redis.

    A chunk's uploads are held in Redis only until its task has run (the task releases
    them), so Redis holds at most `max_in_flight` chunks of this run at any time, each at
    most ASYNC_QUEUE_MAX_BYTES / max_in_flight bytes, instead of the whole folder. Every
    result is read, then deleted.
    """

    def __init__(self, settings: Settings, timeout: float, max_in_flight: int) -> None:
        self.celery: Celery[Any] = Celery("mnist_api")
        self.celery.config_from_object(celery_config(settings))
        self.store = build_job_store(settings)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.max_chunk_bytes = max(1, settings.async_queue_max_bytes // max_in_flight)

    def score(
        self, items: Iterator[Item], size: int, progress: tqdm[Any]
    ) -> Iterator[dict[str, Any]]:
        """Rows in input order; the oldest chunk is gathered before a new one is sent."""
        window: deque[Submitted] = deque()
        for chunk in chunks(items, size, self.max_chunk_bytes):
            refused_since: float | None = None
            while True:
                if len(window) >= self.max_in_flight:
                    yield from self._gather(window.popleft(), progress)
                    continue
                try:
                    window.append(self._submit(chunk))
                    break
                except QueueFull:
                    # Other clients' uploads fill the budget: finish ours first, else wait.
                    if window:
                        yield from self._gather(window.popleft(), progress)
                        continue
                    now = time.monotonic()
                    refused_since = refused_since or now
                    if now - refused_since > self.timeout:
                        window.append(Submitted(chunk, [], error_code=QueueFull.code))
                        break
                    time.sleep(QUEUE_FULL_PAUSE)
        while window:
            yield from self._gather(window.popleft(), progress)

    def _submit(self, chunk: list[Item]) -> Submitted:
        readable = [item.data for item in chunk if item.data is not None]
        hashes = [upload_sha256(data) for data in readable]
        if not hashes:
            return Submitted(chunk, [])
        task_id = str(uuid.uuid4())
        try:
            self.store.hold_uploads(dict(zip(hashes, readable, strict=True)), holder=task_id)
        except BrokerUnavailable:
            return Submitted(chunk, hashes, error_code=BrokerUnavailable.code)
        try:
            self.celery.send_task(PREDICT_UPLOADS, args=(hashes,), task_id=task_id)
        except _BROKER_ERRORS:
            with contextlib.suppress(BrokerUnavailable):  # else they expire with their TTL
                self.store.release_uploads(hashes, holder=task_id)
            return Submitted(chunk, hashes, error_code=BrokerUnavailable.code)
        return Submitted(chunk, hashes, task_id)

    def _gather(self, submitted: Submitted, progress: tqdm[Any]) -> Iterator[dict[str, Any]]:
        outcomes = iter(self._outcomes(submitted))
        for item in submitted.chunk:
            outcome = item.error.to_dict() if item.error else next(outcomes)
            progress.update(1)
            yield row(item.name, outcome)

    def _outcomes(self, submitted: Submitted) -> list[dict[str, Any]]:
        """The task's outcomes, one per hash; a failed or late task gives each its code."""
        code = submitted.error_code
        if code is None and submitted.task_id is not None:
            code, outcomes = self._wait(submitted.task_id, len(submitted.hashes))
            # The task releases its uploads too, just after storing its result; releasing
            # them here as well (a no-op if it did) frees them before the next chunk is
            # sent, so no more than max_in_flight chunks are ever held, and a chunk given
            # up on (--timeout) is not left waiting in Redis.
            with contextlib.suppress(BrokerUnavailable):
                self.store.release_uploads(submitted.hashes, holder=submitted.task_id)
            if code is None:
                return outcomes
        return [failed(code or TASK_FAILED) for _ in submitted.hashes]

    def _wait(self, task_id: str, count: int) -> tuple[str | None, list[dict[str, Any]]]:
        """Poll the result by key until it is final or `timeout` passed; then delete it."""
        result = self.celery.AsyncResult(task_id)
        deadline = time.monotonic() + self.timeout
        pause = 0.02
        try:
            while not result.ready():
                if time.monotonic() > deadline:
                    return TASK_TIMEOUT, []
                time.sleep(pause)
                pause = min(pause * 1.5, 0.5)
            state, value = result.state, result.result
            result.forget()  # read once: the result has nothing more to do in Redis
        except _BROKER_ERRORS:
            return BrokerUnavailable.code, []
        if state == states.SUCCESS and isinstance(value, list) and len(value) == count:
            return None, value
        if isinstance(value, DeadLettered):
            return DeadLettered.code, []
        return TASK_FAILED, []


def failed(code: str) -> dict[str, Any]:
    """The outcome of an image whose task did not give one."""
    return {"error": WHY[code], "code": code}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m mnist_api.jobs.bulk", description=__doc__)
    parser.add_argument("input", type=Path, help="a folder of images or a .zip")
    parser.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    parser.add_argument("--chunk-size", type=int, default=32, help="images per model call/task")
    parser.add_argument("--local", action="store_true", help="score here even with a broker")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per chunk")
    parser.add_argument(
        "--max-in-flight",
        type=_positive,
        default=4,
        help="chunks queued on the workers at once (bounds what Redis holds)",
    )
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    use_workers = bool(settings.redis_url) and not args.local
    # On the workers an image waits in Redis: the async cap applies, as for /predict_async.
    max_bytes = settings.max_content_length
    if use_workers:
        max_bytes = min(max_bytes, settings.async_max_upload_bytes)
    items = read_items(args.input, max_bytes)
    counts = {"predicted": 0, "errors": 0}
    # A progress bar for a person at a terminal; none in CI logs or when piped.
    with (
        tqdm(unit="img", disable=not sys.stderr.isatty()) as progress,
        args.out.open("w", newline="") as handle,
    ):
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        rows = (
            WorkerScorer(settings, args.timeout, args.max_in_flight).score(
                items, args.chunk_size, progress
            )
            if use_workers
            else score_locally(settings, items, args.chunk_size, progress)
        )
        for entry in rows:
            writer.writerow(entry)
            counts["errors" if entry["error_code"] else "predicted"] += 1
    where = "on the Celery workers" if use_workers else "locally"
    sys.stdout.write(
        f"{sum(counts.values())} files scored {where}: {counts['predicted']} predicted, "
        f"{counts['errors']} with an error code -> {args.out}\n"
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
