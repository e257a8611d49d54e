"""The one place that reads the environment: typed settings with defaults.

`Settings.from_env()` turns environment variables into a frozen object; everything else
receives that object (the app factory, gunicorn.conf.py, the worker) and never reads
`os.environ` itself. Tests build `Settings` directly or override fields with `replace()`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mnist_api.rate_windows import parse_windows

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
# What a queued upload costs Redis besides its bytes (mnist_api.jobs.store charges it).
UPLOAD_OVERHEAD_BYTES = 2048
T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable to fix."""


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _rate_limit(raw: str | None, default: str) -> str:
    """RATE_LIMIT: unset means the default; "off" (or "none", "0") turns limits off."""
    if raw is None or not raw.strip():
        return default
    value = raw.strip()
    if value.lower() in ("off", "none", "0", "false"):
        return ""
    try:
        parse_windows(value)
    except ValueError as exc:
        raise ConfigError(f"RATE_LIMIT must look like '120/minute', got {value!r}") from exc
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


# An admin's name in `ADMIN_API_KEYS=name:key,...`: what the deployment history shows.
_ADMIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")


def _admin_keys(
    env: Mapping[str, str], name: str
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """ADMIN_API_KEYS: the admin keys, and (key, name) for the entries written `name:key`.

    An entry is `name:key` when what comes before its first ':' is a name (a letter, then up
    to 31 letters, digits, '_', '.', '-'); any other entry is a plain key (kept working).
    """
    keys: list[str] = []
    names: list[tuple[str, str]] = []
    for entry in _list(env, name):
        name, colon, key = entry.partition(":")
        if colon and key and _ADMIN_NAME.fullmatch(name):
            keys.append(key)
            names.append((key, name))
        else:
            keys.append(entry)
    return tuple(keys), tuple(names)


def _has_model_version(models_dir: Path) -> bool:
    """A cheap look (no model import here: gunicorn's master reads this module)."""
    return models_dir.is_dir() and any(
        (folder / "mnist_cnn_int8.tflite").is_file() for folder in models_dir.iterdir()
    )


# Each setting is declared ONCE, as a Settings field: its default, its environment variable
# and the reader that parses the variable (an unset or blank variable gives the default).
Reader = Callable[[Mapping[str, str], str, Any], Any]
ENV = "env"
READ = "read"


def setting(default: T, env: str, read: Reader) -> T:
    """A Settings field: `default`, read from the variable `env` by `read`."""
    declared: T = dataclasses.field(default=default, metadata={ENV: env, READ: read})
    return declared


def text(env: Mapping[str, str], name: str, default: str) -> str:
    """A string, stripped."""
    return _text(env, name, default)


def lower_text(env: Mapping[str, str], name: str, default: str) -> str:
    """A string, stripped and lower-cased."""
    return _text(env, name, default).lower()


def upper_text(env: Mapping[str, str], name: str, default: str) -> str:
    """A string, stripped and upper-cased."""
    return _text(env, name, default).upper()


def path(env: Mapping[str, str], name: str, default: Path) -> Path:
    """A filesystem path."""
    return Path(_text(env, name, str(default)))


def whole(minimum: int) -> Reader:
    """A whole number of at least `minimum`."""

    def read(env: Mapping[str, str], name: str, default: int) -> int:
        return _int(env, name, default, minimum)

    return read


def number(env: Mapping[str, str], name: str, default: float) -> float:
    """A number."""
    return _float(env, name, default)


def items(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list; empty means the default."""
    return _list(env, name) or default


def flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """On for 1, true, yes or on (any case)."""
    return _text(env, name, "1" if default else "0").lower() in ("1", "true", "yes", "on")


def read_rate_limit(env: Mapping[str, str], name: str, default: str) -> str:
    """RATE_LIMIT: unset means the default; "off" (or "none", "0") turns limits off."""
    return _rate_limit(env.get(name), default)


def read_api_keys(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """API_KEYS, else the single API_KEY."""
    return _list(env, name) or _list(env, "API_KEY") or default


def read_admin_keys(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """The keys of ADMIN_API_KEYS (`name:key` or plain `key` entries)."""
    return _admin_keys(env, name)[0] or default


def read_admin_names(
    env: Mapping[str, str], name: str, default: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """(key, name) of the ADMIN_API_KEYS entries written `name:key`."""
    return _admin_keys(env, name)[1] or default


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, typed. Field docs are in the README's table."""

    api_keys: tuple[str, ...] = setting((), "API_KEYS", read_api_keys)
    # Installed model versions: one folder per version under here (mnist_api/inference/registry.py).
    models_dir: Path = setting(PROJECT_ROOT / "models", "MODELS_DIR", path)  # noqa: RUF009
    # stable at first start; empty: models/default_deployment.json's choice, else the newest
    default_model_version: str = setting("", "DEFAULT_MODEL_VERSION", text)
    max_content_length: int = setting(10 * MIB, "MAX_CONTENT_LENGTH", whole(1))
    max_image_pixels: int = setting(50_000_000, "MAX_IMAGE_PIXELS", whole(1))
    batch_max_files: int = setting(64, "BATCH_MAX_FILES", whole(1))
    # Open Inference Protocol: most images in one `pixels` tensor (28x28 each).
    v2_max_pixels_batch: int = setting(1024, "V2_MAX_PIXELS_BATCH", whole(1))
    # Memory one worker lets its image decodes hold at once, and how long a decode waits for
    # room before the client gets 503 server_busy (README: "Memory per worker").
    decode_memory_budget_mb: int = setting(24, "DECODE_MEMORY_BUDGET_MB", whole(1))
    decode_wait_seconds: float = setting(2.0, "DECODE_WAIT_SECONDS", number)
    cors_origins: tuple[str, ...] = setting(("*",), "CORS_ORIGINS", items)
    redis_url: str = setting("", "REDIS_URL", text)
    cache_ttl_seconds: int = setting(3600, "CACHE_TTL_SECONDS", whole(1))
    cache_max_items: int = setting(10_000, "CACHE_MAX_ITEMS", whole(1))
    cache_socket_timeout: float = setting(0.1, "CACHE_SOCKET_TIMEOUT", number)
    cache_retry_seconds: float = setting(1.0, "CACHE_RETRY_SECONDS", number)
    # Async jobs (Celery on REDIS_URL; in-process "eager" mode without it)
    # Results and issued ids are polled within minutes; an hour bounds what Redis holds.
    result_expires_seconds: int = setting(3600, "RESULT_EXPIRES_SECONDS", whole(1))
    broker_visibility_timeout: int = setting(3600, "BROKER_VISIBILITY_TIMEOUT", whole(1))
    # test and demo only: makes a running task observable
    # Uploads wait in Redis until their task ran: cap each one and all of them together.
    async_max_upload_bytes: int = setting(2 * MIB, "ASYNC_MAX_UPLOAD_BYTES", whole(1))
    async_queue_max_bytes: int = setting(8 * MIB, "ASYNC_QUEUE_MAX_BYTES", whole(1))
    # A message whose worker died is redelivered; after this many deliveries it is
    # dead-lettered instead (a poison upload must not kill workers forever).
    task_max_deliveries: int = setting(3, "TASK_MAX_DELIVERIES", whole(1))
    # seconds; the task gets an exception (0: none)
    task_soft_time_limit: int = setting(60, "TASK_SOFT_TIME_LIMIT", whole(0))
    # seconds; the process running it is killed (0: none)
    task_time_limit: int = setting(120, "TASK_TIME_LIMIT", whole(0))
    # tests only: a worker process exits on this upload
    # Without Redis: the folder where gunicorn's workers share async task ids and results
    # (gunicorn.conf.py sets it); unset, they stay in the one process (tests, scripts).
    local_jobs_dir: str = setting("", "LOCAL_JOBS_DIR", text)
    rate_limit: str = setting("120/minute", "RATE_LIMIT", read_rate_limit)
    # Trust X-Forwarded-For only when told how many proxies append it (app.json: 1 on
    # Heroku); otherwise any client could send a new one per request and escape the limits.
    proxy_fix_x_for: int = setting(0, "PROXY_FIX_X_FOR", whole(0))
    log_level: str = setting("INFO", "LOG_LEVEL", upper_text)
    log_format: str = setting("json", "LOG_FORMAT", lower_text)
    # Metrics: the multiprocess folder is set by gunicorn.conf.py for its workers.
    prometheus_multiproc_dir: str = setting("", "PROMETHEUS_MULTIPROC_DIR", text)
    metrics_token: str = setting("", "METRICS_TOKEN", text)
    low_confidence_threshold: float = setting(0.6, "LOW_CONFIDENCE_THRESHOLD", number)
    # Deployments (issue 12): admin keys may change the deployment; they are API keys too.
    admin_api_keys: tuple[str, ...] = setting((), "ADMIN_API_KEYS", read_admin_keys)
    # (key, name) of the admin keys given as `name:key`: the history names them so.
    admin_names: tuple[tuple[str, str], ...] = setting((), "ADMIN_API_KEYS", read_admin_names)
    # how often a worker re-reads the deployment
    deployment_refresh_seconds: float = setting(1.0, "DEPLOYMENT_REFRESH_SECONDS", number)
    guard_min_requests: int = setting(200, "GUARD_MIN_REQUESTS", whole(1))
    guard_max_low_confidence_delta: float = setting(0.10, "GUARD_MAX_LOW_CONFIDENCE_DELTA", number)
    guard_max_error_delta: float = setting(0.02, "GUARD_MAX_ERROR_DELTA", number)
    guard_min_feedback: int = setting(50, "GUARD_MIN_FEEDBACK", whole(1))
    guard_max_accuracy_drop: float = setting(0.05, "GUARD_MAX_ACCURACY_DROP", number)
    auto_promote: bool = setting(False, "AUTO_PROMOTE", flag)
    auto_promote_min_feedback: int = setting(200, "AUTO_PROMOTE_MIN_FEEDBACK", whole(1))
    auto_promote_probability: float = setting(0.95, "AUTO_PROMOTE_PROBABILITY", number)
    # Trust (issue 21): signs prediction ids and keys an unnamed admin's fingerprint in the
    # deployment history; required like API_KEY. Never logged, never shown.
    secret_key: str = setting("", "SECRET_KEY", text)
    # how long an answer can still be judged
    feedback_max_age_seconds: int = setting(7 * 86_400, "FEEDBACK_MAX_AGE_SECONDS", whole(1))
    # Evidence rules: no key more than this share of any statistic the guard, the bandit,
    # auto-promotion or the retrain holdout read; and at least this many distinct keys.
    evidence_max_share_per_key: float = setting(0.2, "EVIDENCE_MAX_SHARE_PER_KEY", number)
    evidence_min_keys: int = setting(5, "EVIDENCE_MIN_KEYS", whole(1))
    # Feedback store (mnist_api/storage/db.py): DATABASE_URL, or "" for the embedded SQLite file.
    database_url: str = setting("", "DATABASE_URL", text)
    database_timeout_seconds: float = setting(3.0, "DATABASE_TIMEOUT_SECONDS", number)
    # Feedback retention (0 = no limit): ~2.3 KB per row in PostgreSQL, so 100,000 rows are
    # ~230 MB, inside a 1 GB Heroku Postgres plan next to everything else.
    feedback_retention_days: int = setting(365, "FEEDBACK_RETENTION_DAYS", whole(0))
    feedback_max_rows: int = setting(100_000, "FEEDBACK_MAX_ROWS", whole(0))
    # Server (read by gunicorn.conf.py)
    port: int = setting(8000, "PORT", whole(1))
    web_concurrency: int = setting(2, "WEB_CONCURRENCY", whole(1))
    threads: int = setting(4, "GUNICORN_THREADS", whole(1))
    timeout: int = setting(25, "GUNICORN_TIMEOUT", whole(1))
    # A worker is recycled after this many requests (plus up to 10% jitter): about 2 hours
    # of a worker's share of 1,400 answers a second, so a recycle is rare (README).
    max_requests: int = setting(5_000_000, "GUNICORN_MAX_REQUESTS", whole(0))
    # Seconds an idle kept-alive connection is kept (closed at once for a waiting client).
    keepalive: int = setting(2, "GUNICORN_KEEPALIVE", whole(1))
    # A client must send its request head within this many seconds of connecting (or of its
    # first byte on a kept-alive connection), and its body within this many more; slower
    # ones get 408 (mnist_api/serving/gunicorn_worker.py reads requests before a thread
    # serves them).
    request_header_timeout: float = setting(10.0, "REQUEST_HEADER_TIMEOUT", number)
    request_body_timeout: float = setting(60.0, "REQUEST_BODY_TIMEOUT", number)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from `env` (default: the process environment): each field's
        variable, through the reader declared with the field."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            name, read = item.metadata[ENV], item.metadata[READ]
            values[item.name] = read(env, name, item.default)
        return cls(**values)

    def __post_init__(self) -> None:
        # An admin key is also an API key: one list for authentication, one for admin rights.
        merged = tuple(dict.fromkeys(self.api_keys + self.admin_api_keys))
        object.__setattr__(self, "api_keys", merged)

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (for tests and tools)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Refuse to run without what production needs; the message says what to set."""
        if not self.api_keys:
            raise ConfigError(
                "No API key is configured: set API_KEY to a secret (or API_KEYS to a "
                "comma-separated list) before starting the service."
            )
        if not 0 < self.evidence_max_share_per_key <= 1:
            raise ConfigError(
                "EVIDENCE_MAX_SHARE_PER_KEY must be above 0 and at most 1, got "
                f"{self.evidence_max_share_per_key}"
            )
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"LOG_FORMAT must be 'json' or 'text', got {self.log_format!r}")
        for name, value in (
            ("GUARD_MAX_LOW_CONFIDENCE_DELTA", self.guard_max_low_confidence_delta),
            ("GUARD_MAX_ERROR_DELTA", self.guard_max_error_delta),
            ("GUARD_MAX_ACCURACY_DROP", self.guard_max_accuracy_drop),
            ("AUTO_PROMOTE_PROBABILITY", self.auto_promote_probability),
        ):
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} must be a number from 0 to 1, got {value}")
        if self.request_header_timeout <= 0 or self.request_body_timeout <= 0:
            raise ConfigError("REQUEST_HEADER_TIMEOUT and REQUEST_BODY_TIMEOUT must be above 0")
        if self.deployment_refresh_seconds <= 0:
            raise ConfigError("DEPLOYMENT_REFRESH_SECONDS must be above 0")
        if self.async_queue_max_bytes < self.async_max_upload_bytes + UPLOAD_OVERHEAD_BYTES:
            raise ConfigError(
                "ASYNC_QUEUE_MAX_BYTES must be at least ASYNC_MAX_UPLOAD_BYTES + "
                f"{UPLOAD_OVERHEAD_BYTES}, or no async upload of the largest allowed size could "
                f"ever be queued (got {self.async_queue_max_bytes} for uploads of up to "
                f"{self.async_max_upload_bytes} bytes)."
            )
        if not _has_model_version(self.models_dir):
            raise ConfigError(
                f"MODELS_DIR ({self.models_dir}) holds no model version folder "
                "(<version>/mnist_cnn_int8.tflite); run `make model` or set MODELS_DIR."
            )
        if not self.secret_key:
            raise ConfigError(
                "No SECRET_KEY is configured: set SECRET_KEY to a long random secret (e.g. "
                "`openssl rand -hex 32`) before starting the service; it signs the prediction ids "
                "that feedback refers to and keys the admins' fingerprints."
            )
