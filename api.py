"""WSGI entry point: `gunicorn api:app -c gunicorn.conf.py`."""

from mnist_api.app import create_app

app = create_app()
