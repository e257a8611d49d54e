"""MNIST digit prediction service. `create_app()` (in `mnist_api.app`) builds the Flask app.

Importing the package is cheap on purpose: gunicorn.conf.py imports `mnist_api.config` in
the master process, which must not pull in prometheus_client (its multiprocess folder is
only created by the master's `on_starting` hook), the model runtime or Flask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mnist_api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    """Load `create_app` on first use, so `from mnist_api import create_app` still works."""
    if name == "create_app":
        from mnist_api.app import create_app  # noqa: PLC0415 - lazy by design

        return create_app
    raise AttributeError(name)
