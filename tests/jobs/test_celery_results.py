"""The result backend overrides Celery's private `RedisBackend._get_pool`
(mnist_api/jobs/results.py): pinned to one Celery version, and checked here against the
installed one, so an upgrade that renames or stops calling it fails this test instead of
silently opening a connection pool per thread again."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

from celery import Celery
from celery.backends.redis import RedisBackend

from mnist_api import redis_clients
from mnist_api.config import PROJECT_ROOT
from mnist_api.jobs.results import PooledRedisBackend, backend_url

URL = "redis://127.0.0.1:1/0"  # never connected to: building a client opens no socket


def test_celery_is_pinned_to_the_version_the_override_was_checked_against() -> None:
    pinned = re.search(r"^celery==(\S+)$", (PROJECT_ROOT / "requirements.txt").read_text(), re.M)
    assert pinned is not None, "requirements.txt must pin celery with == (see this file)"
    assert version("celery") == pinned.group(1)


def test_celery_still_builds_its_client_through_get_pool() -> None:
    assert "_get_pool" in vars(RedisBackend), "celery changed: re-read RedisBackend"
    source = inspect.getsource(RedisBackend._create_client)
    assert "self._get_pool(**params)" in source, "celery changed: re-read _create_client"


def test_the_backend_client_uses_the_shared_results_pool() -> None:
    app = Celery("results-test", set_as_current=False)
    app.conf.result_backend = backend_url(URL)
    backend = PooledRedisBackend(app=app, url=URL)
    assert backend.client.connection_pool is redis_clients.pool(URL, redis_clients.RESULTS)
