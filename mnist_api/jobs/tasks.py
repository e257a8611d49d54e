"""Celery, wired the way Flask's own Celery example does it, and the prediction tasks.

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

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task, shared_task, states
from flask import Flask
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mnist_api.config import Settings
from mnist_api.extensions import get_job_store, get_service, get_settings
from mnist_api.http.errors import BrokerUnavailable, DeadLettered, ServiceError
from mnist_api.inference.service import Route
from mnist_api.jobs.results import backend_url
from mnist_api.jobs.store import local_results_folder
from mnist_api.redis_clients import celery_tls_options

CELERY = "celery"
PREDICT_UPLOAD = "mnist_api.predict_upload"
PREDICT_UPLOADS = "mnist_api.predict_uploads"

# What a task returns: {"result": <prediction>} or {"error": <sentence>, "code": <code>}.
Outcome = dict[str, Any]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for this service (Redis broker, or eager in-process)."""
    config: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_expires_seconds,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        # One message at a time per process: a killed worker strands at most that one.
        "worker_prefetch_multiplier": 1,
        # A task that hangs gets SoftTimeLimitExceeded, then its process is killed; either
        # way it is marked FAILURE (0 in the settings: no limit).
        "task_soft_time_limit": settings.task_soft_time_limit or None,
        "task_time_limit": settings.task_time_limit or None,
        # A message redelivered after its task stored SUCCESS (the worker died before the
        # ack) is not run again: its upload may already be released.
        "worker_deduplicate_successful_tasks": True,
        # loguru owns logging; Celery must not install its own handlers or grab stdout.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
    }
    if not settings.redis_url:
        # Results in this process's memory, or (under gunicorn) in files every worker reads.
        results = "cache+memory://"
        if settings.local_jobs_dir:
            results = f"file://{local_results_folder(Path(settings.local_jobs_dir))}"
        config.update(
            task_always_eager=True,
            task_store_eager_result=True,
            result_backend=results,
        )
        return config
    transport: dict[str, Any] = {
        "visibility_timeout": settings.broker_visibility_timeout,
        "socket_timeout": 2.0,
        "socket_connect_timeout": 1.0,
    }
    if settings.broker_visibility_timeout < 100:
        # kombu sweeps for the messages of dead workers about every 100 s by default; with
        # a short visibility timeout, sweep every second so they are redelivered promptly.
        transport.update(unacked_restore_interval=1, unacked_restore_throttle=1)
    config.update(
        broker_url=settings.redis_url,
        # Results through the shared `RESULTS` pool (its timeouts: 2 s, connect 1 s).
        result_backend=backend_url(settings.redis_url),
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
        # Accepting a job must fail fast (503) when Redis is down, not retry for seconds.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
    )
    tls = celery_tls_options(settings.redis_url)
    if tls is not None:
        # The broker (kombu) makes its own connections; it gets the same TLS decision. The
        # result backend uses the shared pool, but Celery checks the option is there.
        config["broker_use_ssl"] = tls
        config["redis_backend_use_ssl"] = tls
    return config


def celery_init_app(app: Flask, settings: Settings) -> Celery[Any]:
    """Create the Celery app whose tasks run inside this Flask app's context."""

    class FlaskTask(Task):  # type: ignore[type-arg]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

        def after_return(  # noqa: PLR0917 - Celery's handler signature
            self,
            status: str,
            retval: Any,
            task_id: str,
            args: Any,
            kwargs: Any,
            einfo: Any,
        ) -> None:
            # Called once the outcome is stored (also by the worker's main process when the
            # hard time limit killed the task). A retry is not an end: the upload stays.
            if status in states.READY_STATES:
                with app.app_context():
                    release_uploads(self.name, task_id, list(args or ()))
                    get_job_store().clear_deliveries(task_id)

    celery_app: Celery[Any] = Celery("mnist_api", task_cls=FlaskTask)
    celery_app.config_from_object(celery_config(settings))
    celery_app.set_default()
    app.extensions[CELERY] = celery_app
    return celery_app


def held_uploads(task_name: str, args: list[Any]) -> list[str]:
    """The upload hashes a task of `task_name` with `args` holds."""
    if task_name == PREDICT_UPLOAD and args:
        return [str(args[0])]
    if task_name == PREDICT_UPLOADS and args:
        return [str(sha) for sha in args[0]]
    return []


def release_uploads(task_name: str, task_id: str, args: list[Any]) -> None:
    """The task has run: drop its hold on its uploads, which deletes those nobody else holds."""
    sha256s = held_uploads(task_name, args)
    try:
        get_job_store().release_uploads(sha256s, holder=task_id)
    except BrokerUnavailable:
        # Redis is down: the uploads go with their TTL instead, and the outcome stands.
        logger.warning("could not release the uploads of task {}", task_id)


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


def _crash_for_tests(task: Task, sha256s: list[str]) -> None:  # type: ignore[type-arg]
    poison = get_settings().task_crash_on_sha256
    if poison and poison in sha256s and not task.request.is_eager:
        # TASK_CRASH_ON_SHA256 (tests only): the upload "kills" the worker process, as a
        # decoder crash or the kernel's OOM killer would.
        logger.warning("TASK_CRASH_ON_SHA256: this worker process exits now")
        os._exit(70)


def _pause_for_tests() -> None:
    delay = get_settings().task_delay_seconds
    if delay > 0:
        time.sleep(delay)  # TASK_DELAY_SECONDS: lets a test catch a task while it runs


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
        _pause_for_tests()
        _crash_for_tests(self, [sha256])
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
        _pause_for_tests()
        _crash_for_tests(self, sha256s)
        return _outcomes(sha256s)
