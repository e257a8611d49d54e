"""WSGI entry point: `gunicorn api:app -c gunicorn.conf.py`."""

from mnist_api import create_app

app = create_app()
