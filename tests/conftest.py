"""Shared fixtures: settings, the app and its test client, and a real gunicorn over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from apiflask import APIFlask
from flask.testing import FlaskClient

from mnist_api import create_app
from mnist_api.config import PROJECT_ROOT, Settings
from mnist_api.extensions import CACHE
from mnist_api.storage import db
from tests.worker_process import Worker
from tools.redis_server import RedisServer
from tools.services import (
    API_KEYS,
    TEST_SECRET_KEY,
    LiveServer,
    free_port,
    procfile_command,
    start_web,
    stop,
    venv_env,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--soak-seconds`: how long the soak test runs (`make soak` gives it 120)."""
    parser.addoption("--soak-seconds", type=float, default=8.0)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for tests: two API keys, the committed model, text logs, no rate limit, and a
    migrated SQLite feedback database of the session's own (never the repository's)."""
    database_url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'feedback.db'}"
    db.upgrade(database_url)
    return Settings(
        api_keys=API_KEYS,
        secret_key=TEST_SECRET_KEY,
        log_format="text",
        log_level="WARNING",
        rate_limit="",
        database_url=database_url,
    )


@pytest.fixture(scope="session")
def app(settings: Settings) -> APIFlask:
    """One app with the real model, loaded once for the session."""
    application = create_app(settings)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app: APIFlask) -> FlaskClient:
    """A Flask test client of the session app, its in-memory cache emptied first."""
    app.extensions[CACHE].clear()
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers that carry a valid API key."""
    return {"x-api-key": API_KEYS[0]}


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real service: the Procfile's gunicorn command, 2 workers, the committed model."""
    server = start_web(tmp_path_factory.mktemp("live"))
    try:
        yield server
    finally:
        stop(server.process)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh real redis-server on a free port for one test."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def worker_command() -> list[str]:
    """The Procfile's worker line, with the test worker entry (tests/worker_entry.py: the
    fault hooks TASK_DELAY_SECONDS and TASK_CRASH_ON_SHA256) in place of make_celery."""
    shell, flag, command = procfile_command("worker")
    assert " -A make_celery " in command
    return [shell, flag, command.replace(" -A make_celery ", " -A tests.worker_entry ")]


@pytest.fixture
def start_worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start Procfile workers on the test's Redis; all are stopped at the end."""
    workers: list[Worker] = []

    def start(**env: str) -> Worker:
        log_path = tmp_path / f"worker-{len(workers)}.log"
        defaults = {
            "REDIS_URL": redis_server.url,
            "API_KEYS": ",".join(API_KEYS),
            "SECRET_KEY": TEST_SECRET_KEY,
            "CELERY_CONCURRENCY": "1",
            "LOG_FORMAT": "json",
            # The worker reads the deployment too: from a file of the test's own.
            "DATABASE_URL": f"sqlite:///{tmp_path / 'worker.db'}",
        }
        environment = venv_env(**{**defaults, **env})
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                worker_command(),
                cwd=PROJECT_ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(process, log_path)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="session")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A models folder with every committed version plus a real, deliberately bad one.

    Returns (folder, stable, bad): `stable` is the committed default version, `bad` a
    `.tflite` trained on shuffled labels (tests/bad_model.py), which answers with near-
    uniform, low-confidence guesses. Trained once per session, in a subprocess.
    """
    from mnist_api.inference.registry import ModelRegistry  # noqa: PLC0415 - only for this fixture

    folder = tmp_path_factory.mktemp("models")
    committed = PROJECT_ROOT / "models"
    for version in ModelRegistry.discover(committed).versions():
        shutil.copytree(committed / version, folder / version)
    stable = ModelRegistry.discover(committed).newest
    result = subprocess.run(
        [sys.executable, "-m", "tests.bad_model", str(folder)],
        cwd=PROJECT_ROOT,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    bad = result.stdout.strip().splitlines()[-1]
    return folder, stable, bad
