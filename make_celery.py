"""Celery worker entry point: `celery -A make_celery worker` (see the Procfile)."""

from celery.signals import setup_logging

from mnist_api.app import create_app


@setup_logging.connect
def _keep_loguru(**_kwargs: object) -> None:
    """create_app() already routed logging into loguru; this stops Celery adding its own."""


flask_app = create_app()
celery_app = flask_app.extensions["celery"]
