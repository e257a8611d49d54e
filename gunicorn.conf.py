"""gunicorn settings for a Heroku dyno or any container; values come from mnist_api.config."""

from mnist_api.config import Settings
from mnist_api.logs import configure_logging

_settings = Settings.from_env()

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.web_concurrency
# Threads let a worker overlap slow uploads; each thread gets its own LiteRT interpreter.
worker_class = "gthread"
threads = _settings.threads
# Heroku's router gives up after 30 s: answer (or fail) before it does.
timeout = _settings.timeout
graceful_timeout = 20
keepalive = 5
# Recycle workers now and then so slow leaks cannot grow without bound; jitter staggers them.
max_requests = 5000
max_requests_jitter = 500
# Never preload: each worker loads the model after the fork, never the master.
preload_app = False
accesslog = None  # the app logs one JSON line per request itself
errorlog = "-"
loglevel = _settings.log_level.lower()


def on_starting(server: object) -> None:
    """Route gunicorn's own logs through loguru in the master."""
    configure_logging(_settings.log_level, _settings.log_format)
