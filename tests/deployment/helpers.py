"""Shared helpers of the in-process deployment tests (tests/deployment/test_deployment_*.py:
the routes, the choice per request, the guard and auto-promotion, the stores, the CLI; a
real PostgreSQL server is in test_deployment_durable.py, gunicorn with two workers in
test_deployment_live.py). The candidate is a real `.tflite` trained on shuffled labels (the
`two_versions` fixture)."""

from __future__ import annotations

from pathlib import Path

from mnist_api.deployment.manager import DeploymentManager
from mnist_api.deployment.store import MemoryDeploymentStore
from mnist_api.storage import db
from tests.samples import as_paper, encode, sample
from tools.services import API_KEYS

ADMIN = "admin-key-for-tests"
ADMIN_HEADERS = {"x-api-key": ADMIN}
USER_HEADERS = {"x-api-key": API_KEYS[0]}
ROUTES = [
    ("get", "/deployment"),
    ("put", "/deployment"),
    ("post", "/deployment/promote"),
    ("post", "/deployment/rollback"),
    ("get", "/deployment/history"),
]
ADMIN_ROUTES = [route for route in ROUTES if route[0] != "get"]


def migrated_database(folder: Path) -> str:
    """A fresh SQLite database with every migration applied (the store's tables)."""
    url = f"sqlite:///{folder / 'service.db'}"
    db.upgrade(url)
    return url


def png_of(digit: int) -> bytes:
    return encode(as_paper(sample(digit)))


def manager_for(installed: tuple[str, ...] = ("aaaaaaaaaaaa", "bbbbbbbbbbbb")) -> DeploymentManager:
    return DeploymentManager(MemoryDeploymentStore(), installed, installed[0])
