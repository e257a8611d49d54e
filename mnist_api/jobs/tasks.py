"""The prediction tasks (Celery wiring: `mnist_api.jobs.celery_app`).

Broker and result backend are `REDIS_URL`; JSON only (never pickle). Tasks are acked late
and rejected when their worker dies, so a `kill -9` mid-task leaves the message to another
worker; they are idempotent (the cache key makes a re-run harmless). Every task completes:
- a transient Redis error (refused, timed out) is retried with exponential backoff;
- each delivery of a message is counted in Redis; a message delivered more than
  TASK_MAX_DELIVERIES times (each run killed its worker process: a poison upload) is not run
  again but dead-lettered: FAILURE with code `dead_lettered`, its id on `dead:tasks`;
- a soft and a hard time limit end a task that hangs (FAILURE, code `task_failed`);
and when it has run, it releases its uploads. Without `REDIS_URL` tasks run in-process
("eager"), so `/predict_async` works under `make run` too.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mnist_api.errors import BrokerUnavailable, DeadLettered, ServiceError
from mnist_api.extensions import get_job_store, get_service, get_settings
from mnist_api.inference.routing import Route
from mnist_api.jobs.celery_app import PREDICT_UPLOAD, PREDICT_UPLOADS, Outcome


def _count_delivery(task: Task) -> None:  # type: ignore[type-arg]
    """Count this delivery; past TASK_MAX_DELIVERIES, dead-letter the task instead of running it.

    A message whose worker process died (killed by the upload itself, say) is given back and
    delivered again; without a cap it would kill every worker forever. Retries have their
    own counts: a retry is a new message, not a redelivery.
    """
    if task.request.is_eager:
        return
    store = get_job_store()
    task_id = str(task.request.id)
    deliveries = store.record_delivery(task_id, int(task.request.retries or 0))
    cap = get_settings().task_max_deliveries
    if deliveries > cap:
        store.dead_letter(task_id)
        logger.error("task dead-lettered: its worker process died on each of {} deliveries", cap)
        raise DeadLettered()


def _outcomes(
    sha256s: list[str],
    version: str | None = None,
    *,
    client: str = "",
    routed: bool = False,
    deployment: str = "",
) -> list[Outcome]:
    """Predict the stored uploads with `version` (None: the deployment's choice); an expired
    or bad upload becomes its error. `client`, `routed` and `deployment` are the asking key,
    whether the web dyno's deployment chose `version` and its id: what the answers' prediction
    ids bind (a routed answer is evidence for the guard, a pinned one is not)."""
    uploads = get_job_store().get_uploads(sha256s)
    present = [data for data in uploads if data is not None]
    service = get_service()
    if version is not None and version not in service.registry:
        # Queued by a web dyno with a version this (older) worker lacks: still answer.
        logger.warning("version {} is not installed on this worker; using the deployment", version)
        version = None
    if version is None:
        route = service.route_for(client)
    else:
        route = Route(version, routed=routed, deployment=deployment or service.router.deployment_id)
    answers = iter(service.predict_many(present, client=client, route=route))
    outcomes: list[Outcome] = []
    for data in uploads:
        if data is None:
            outcomes.append(
                {"error": "The upload expired before it was processed.", "code": "upload_expired"}
            )
            continue
        answer = next(answers)
        if isinstance(answer, ServiceError):
            outcomes.append(answer.to_dict())
        else:
            outcomes.append({"result": answer})
    return outcomes


# Transient Redis errors (the job store raises BrokerUnavailable for them) are retried after
# about 1, 2, 4, 8, 16 s (with jitter); then the task fails. A retry is a new message.
RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": (BrokerUnavailable, RedisConnectionError, RedisTimeoutError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 5,
    # Expected outcomes, logged without a traceback.
    "throws": (DeadLettered,),
}


@shared_task(bind=True, name=PREDICT_UPLOAD, **RETRY_OPTIONS)
def predict_upload(
    self: Task,  # type: ignore[type-arg]
    sha256: str,
    request_id: str,
    version: str | None = None,
    *,
    client: str = "",
    routed: bool = False,
    deployment: str = "",
) -> Outcome:
    """Predict one stored upload (queued by /predict_async) with the version chosen then,
    for the key `client` (routed: the deployment chose it)."""
    with logger.contextualize(request_id=request_id, task_id=self.request.id):
        _count_delivery(self)
        outcome = _outcomes([sha256], version, client=client, routed=routed, deployment=deployment)[
            0
        ]
        logger.info("task done", code=outcome.get("code"))
        return outcome


@shared_task(bind=True, name=PREDICT_UPLOADS, **RETRY_OPTIONS)
def predict_uploads(
    self: Task,  # type: ignore[type-arg]
    sha256s: list[str],
) -> list[Outcome]:
    """Predict a chunk of stored uploads in one model call (bulk scoring)."""
    with logger.contextualize(task_id=self.request.id):
        _count_delivery(self)
        return _outcomes(sha256s)
