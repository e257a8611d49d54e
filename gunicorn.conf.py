"""gunicorn settings for a Heroku dyno or any container; values come from mnist_api.config."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from loguru import logger

from mnist_api.config import Settings
from mnist_api.logs import configure_logging
from mnist_api.serving.gunicorn_logging import LoguruGunicornLogger

_settings = Settings.from_env()
# Before gunicorn builds its own logger: the master's lines are JSON from the first one.
configure_logging(_settings.log_level, _settings.log_format)

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.web_concurrency
# Threads let a worker overlap slow uploads; each thread gets its own LiteRT interpreter.
# gthread, with keep-alive only while nobody waits (mnist_api/serving/gunicorn_worker.py).
worker_class = "mnist_api.serving.gunicorn_worker.KeepAliveWhenIdleWorker"
threads = _settings.threads
# One fair queue in front of all workers: the kernel's accept queue. A plain gthread worker
# accepts connections even with every thread busy and keeps them alive, so a client's (or a
# proxy's) persistent connections could all stick to one worker while the others idle:
# measured here, wrk's 8 or 32 connections often all landed on one of two workers, halving
# throughput. So a worker takes only as many connections as it has threads, and keeps one
# alive after an answer only while no other client waits in the queue (then it answers
# "Connection: close" and the next connection goes to whichever worker is free). Keep-alive
# saves a TCP accept per request (~0.25 ms of worker CPU on a cached answer). Measured
# alternatives: a cap a little above the threads starved queued connections (p99 2 s at 32
# clients); SO_REUSEPORT balances too, but every worker recycle resets the connections
# queued on that worker's own socket.
worker_connections = threads
# A worker whose heartbeat stops this long (stuck booting, or its main loop blocked) is killed
# and replaced. gthread workers beat while request threads run: no limit on one request.
timeout = _settings.timeout
graceful_timeout = 20
# Seconds an idle connection is kept (closed at once if someone waits); GUNICORN_KEEPALIVE.
keepalive = _settings.keepalive
# Recycle workers now and then so slow leaks cannot grow without bound; jitter staggers them.
max_requests = _settings.max_requests  # 0 turns recycling off (the soak test does)
max_requests_jitter = _settings.max_requests // 10
# gunicorn's control socket is one path per user: two services on one host would fight
# over it, and a dyno has no use for it.
control_socket_disable = True
# Never preload: each worker loads the model after the fork, never the master.
preload_app = False

# Logs: loguru only. The app writes one JSON line per request, so gunicorn's access log is off.
logger_class = LoguruGunicornLogger
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()

# Prometheus multiprocess mode: every worker writes its samples into this folder and /metrics
# sums them. It must be in the environment before a worker imports prometheus_client, so it
# is set here (gunicorn puts raw_env into the master's environment, which workers inherit).
# One folder per port keeps two services on one machine from mixing their numbers.
metrics_dir = _settings.prometheus_multiproc_dir or str(
    Path(tempfile.gettempdir()) / f"mnist-api-metrics-{_settings.port}"
)
raw_env = [f"PROMETHEUS_MULTIPROC_DIR={metrics_dir}"]

# Without Redis, async tasks run inside the request that accepts them, but the client's poll
# of /tasks/<id> may reach any worker: the workers share task ids and results as files in
# this folder (one per port, like the metrics). Nothing in it is ever deleted here; the job
# store removes its own files once they are older than RESULT_EXPIRES_SECONDS.
jobs_dir = ""
if not _settings.redis_url:
    jobs_dir = _settings.local_jobs_dir or str(
        Path(tempfile.gettempdir()) / f"mnist-api-jobs-{_settings.port}"
    )
    raw_env.append(f"LOCAL_JOBS_DIR={jobs_dir}")


def on_starting(server: Any) -> None:
    """Before any worker starts: the jobs folder (without Redis), a metrics folder without a
    previous run's samples, and the embedded database migrated."""
    if jobs_dir:
        Path(jobs_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(metrics_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # Sample files left by a previous run would be summed into this run's numbers. Only
    # prometheus_client's own `*.db` files go: PROMETHEUS_MULTIPROC_DIR may name a folder
    # that holds other things (a mounted volume, a home directory), which are not ours.
    for samples in folder.glob("*.db"):
        if samples.is_file():
            samples.unlink(missing_ok=True)
    _migrate_embedded_database()


def _migrate_embedded_database() -> None:
    """Apply the migrations to the embedded SQLite file (`make run`, a container, the tests).

    Only the master, once, before the workers fork. A server database (DATABASE_URL) is
    migrated by the Procfile's release phase instead: web dynos starting together must not
    race on its schema. A failure is logged and the service starts anyway: /feedback and
    admin changes answer 503 until the file is usable, and the workers serve the first-start
    deployment.
    """
    from mnist_api.storage import db  # noqa: PLC0415 - SQLAlchemy only when gunicorn starts

    if not db.is_sqlite(_settings.database_url):
        return
    try:
        db.upgrade(_settings.database_url)
    except Exception as error:  # never keep predictions from starting
        logger.error(
            "could not migrate the database (feedback, deployment) {}: {}",
            db.describe(_settings.database_url),
            error,
        )


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (in-flight requests, model info) from /metrics."""
    from prometheus_client import multiprocess  # noqa: PLC0415 - after the env is set

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
