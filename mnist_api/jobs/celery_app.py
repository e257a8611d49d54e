"""Celery wiring, the way Flask's own Celery example does it: the configuration, the Celery
app whose tasks run inside the Flask app's context, the task names and the uploads a task holds.

Broker and result backend are `REDIS_URL`; JSON only (never pickle). Without `REDIS_URL` tasks
run in-process ("eager"), so `/predict_async` works under `make run` too. The task bodies are in
`mnist_api.jobs.tasks`; their names are fixed strings here, so queued messages of an older
release (whose modules were elsewhere) still find them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery, Task, states
from flask import Flask
from loguru import logger

from mnist_api.config import Settings
from mnist_api.errors import BrokerUnavailable
from mnist_api.extensions import get_job_store
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
