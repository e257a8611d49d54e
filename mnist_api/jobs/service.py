"""Accepting async jobs and reporting on them: the service layer behind /predict_async."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery, states
from kombu.exceptions import KombuError, OperationalError
from loguru import logger
from redis import RedisError

from mnist_api.errors import (
    BrokerUnavailable,
    DeadLettered,
    PayloadTooLarge,
    TaskFailed,
    TaskNotFound,
)
from mnist_api.imaging.digest import upload_sha256
from mnist_api.inference.service import PredictionService
from mnist_api.jobs.celery_app import PREDICT_UPLOAD
from mnist_api.jobs.store import JobStore

# What can go wrong while handing a message to the broker.
_BROKER_ERRORS = (OperationalError, KombuError, RedisError, ConnectionError, OSError, TimeoutError)


@dataclass
class JobService:
    """Queues predictions on Celery and reads their state back."""

    service: PredictionService
    store: JobStore
    celery: Celery[Any]
    # Uploads wait in Redis until a worker runs their task: a smaller cap than /predict's.
    max_upload_bytes: int = 2 * 1024 * 1024

    @property
    def eager(self) -> bool:
        """True when tasks run in-process because no broker is configured."""
        return bool(self.celery.conf.task_always_eager)

    def submit(
        self, data: bytes, request_id: str, *, client: str = "", version: str | None = None
    ) -> str:
        """Validate the upload now, queue its prediction, and return the task id.

        The version is chosen now, as for /predict (`version` pins it, else the deployment
        decides for the key fingerprint `client`), and travels in the task message, so an
        A/B group or a canary draw holds for async jobs too.

        Raises the same 4xx errors as /predict, `PayloadTooLarge` over the async cap,
        `QueueFull` when the uploads waiting for workers fill their budget, or
        `BrokerUnavailable`; either way nothing is left half-accepted: an id is only handed
        out once its task is queued, and the upload is only kept while its task is.
        """
        if len(data) > self.max_upload_bytes:
            raise PayloadTooLarge(
                f"An async upload may be at most {self.max_upload_bytes} bytes (this one has "
                f"{len(data)}); send it to /predict instead."
            )
        task_id = str(uuid.uuid4())
        route = self.service.route_for(client, version)
        answering = route.answer
        cached = self.service.lookup(data, route, client)
        if cached is not None:
            # Already answered: the task is complete at birth, no worker needed.
            self.store.issue(task_id)
            self._store_result(task_id, {"result": cached})
            return task_id
        self.service.validate(data)
        sha256 = upload_sha256(data)
        # Held for this task only: it releases the upload when it has run.
        self.store.hold_uploads({sha256: data}, holder=task_id)
        try:
            self.store.issue(task_id)
            self.celery.tasks[PREDICT_UPLOAD].apply_async(
                # The key and whether the deployment chose the version travel with the task:
                # its answer's prediction id is the asker's, and only a routed one is evidence.
                args=(sha256, request_id, answering),
                kwargs={"client": client, "routed": route.routed, "deployment": route.deployment},
                task_id=task_id,
            )
        except (*_BROKER_ERRORS, BrokerUnavailable) as error:
            self.store.forget(task_id)
            with contextlib.suppress(BrokerUnavailable):  # else it expires with its TTL
                self.store.release_uploads([sha256], holder=task_id)
            logger.warning("broker refused a task: {}", type(error).__name__)
            raise BrokerUnavailable() from error
        return task_id

    def status(self, task_id: str) -> dict[str, Any]:
        """The contract's task status object; `TaskNotFound` for ids never issued."""
        if not _is_uuid(task_id) or not self.store.was_issued(task_id):
            raise TaskNotFound()
        try:
            result = self.celery.AsyncResult(task_id)
            state = result.state
            value = result.result if state in (states.SUCCESS, states.FAILURE) else None
        except _BROKER_ERRORS as error:
            raise BrokerUnavailable() from error
        if state == states.SUCCESS and isinstance(value, dict) and "result" in value:
            return {"state": states.SUCCESS, "result": value["result"]}
        if state == states.SUCCESS and isinstance(value, dict) and "error" in value:
            # The upload itself was refused by the worker (e.g. it expired).
            return {"state": states.FAILURE, "status": value["error"], "code": value["code"]}
        if state in (states.FAILURE, states.SUCCESS):
            failure = value if isinstance(value, DeadLettered) else TaskFailed()
            return {"state": states.FAILURE, "status": failure.message, "code": failure.code}
        if state == states.STARTED:
            return {"state": states.STARTED, "status": "The prediction is running."}
        # PENDING, RETRY, RECEIVED: queued and waiting for a worker.
        return {"state": states.PENDING, "status": "Queued; waiting for a worker."}

    def broker_status(self) -> str:
        """`eager`, `ok` or `down`, for /readyz."""
        if self.eager:
            return "eager"
        return "ok" if self.store.reachable() else "down"

    def _store_result(self, task_id: str, outcome: dict[str, Any]) -> None:
        try:
            self.celery.backend.store_result(task_id, outcome, states.SUCCESS)
        except _BROKER_ERRORS as error:
            self.store.forget(task_id)
            raise BrokerUnavailable() from error


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
