"""The one place that reads the environment: typed settings with defaults.

`Settings.from_env()` turns environment variables into a frozen object; everything else
receives that object (the app factory, gunicorn.conf.py, the worker) and never reads
`os.environ` itself. Tests build `Settings` directly or override fields with `replace()`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mnist_api.rate_windows import parse_windows

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
# What a queued upload costs Redis besides its bytes (mnist_api.jobs.store charges it).
UPLOAD_OVERHEAD_BYTES = 2048


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


def _admin_keys(env: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """ADMIN_API_KEYS: the admin keys, and (key, name) for the entries written `name:key`.

    An entry is `name:key` when what comes before its first ':' is a name (a letter, then up
    to 31 letters, digits, '_', '.', '-'); any other entry is a plain key (kept working).
    """
    keys: list[str] = []
    names: list[tuple[str, str]] = []
    for entry in _list(env, "ADMIN_API_KEYS"):
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


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, typed. Field docs are in the README's table."""

    api_keys: tuple[str, ...] = ()
    # Installed model versions: one folder per version under here (mnist_api/inference/registry.py).
    models_dir: Path = PROJECT_ROOT / "models"
    default_model_version: str = ""  # stable at first start; empty: the newest installed
    max_content_length: int = 10 * MIB
    max_image_pixels: int = 50_000_000
    batch_max_files: int = 64
    # Open Inference Protocol: most images in one `pixels` tensor (28x28 each).
    v2_max_pixels_batch: int = 1024
    # Memory one worker lets its image decodes hold at once, and how long a decode waits for
    # room before the client gets 503 server_busy (README: "Memory per worker").
    decode_memory_budget_mb: int = 24
    decode_wait_seconds: float = 2.0
    cors_origins: tuple[str, ...] = ("*",)
    redis_url: str = ""
    cache_ttl_seconds: int = 3600
    cache_max_items: int = 10_000
    cache_socket_timeout: float = 0.1
    cache_retry_seconds: float = 1.0
    # Async jobs (Celery on REDIS_URL; in-process "eager" mode without it)
    # Results and issued ids are polled within minutes; an hour bounds what Redis holds.
    result_expires_seconds: int = 3600
    broker_visibility_timeout: int = 3600
    task_delay_seconds: float = 0.0  # test and demo only: makes a running task observable
    # Uploads wait in Redis until their task ran: cap each one and all of them together.
    async_max_upload_bytes: int = 2 * MIB
    async_queue_max_bytes: int = 8 * MIB
    # A message whose worker died is redelivered; after this many deliveries it is
    # dead-lettered instead (a poison upload must not kill workers forever).
    task_max_deliveries: int = 3
    task_soft_time_limit: int = 60  # seconds; the task gets an exception (0: none)
    task_time_limit: int = 120  # seconds; the process running it is killed (0: none)
    task_crash_on_sha256: str = ""  # tests only: a worker process exits on this upload
    # Without Redis: the folder where gunicorn's workers share async task ids and results
    # (gunicorn.conf.py sets it); unset, they stay in the one process (tests, scripts).
    local_jobs_dir: str = ""
    rate_limit: str = "120/minute"
    # Trust X-Forwarded-For only when told how many proxies append it (app.json: 1 on
    # Heroku); otherwise any client could send a new one per request and escape the limits.
    proxy_fix_x_for: int = 0
    log_level: str = "INFO"
    log_format: str = "json"
    # Metrics: the multiprocess folder is set by gunicorn.conf.py for its workers.
    prometheus_multiproc_dir: str = ""
    metrics_token: str = ""
    low_confidence_threshold: float = 0.6
    # Deployments (issue 12): admin keys may change the deployment; they are API keys too.
    admin_api_keys: tuple[str, ...] = ()
    # (key, name) of the admin keys given as `name:key`: the history names them so.
    admin_names: tuple[tuple[str, str], ...] = ()
    deployment_refresh_seconds: float = 1.0  # how often a worker re-reads the deployment
    guard_min_requests: int = 200
    guard_max_low_confidence_delta: float = 0.10
    guard_max_error_delta: float = 0.02
    guard_min_feedback: int = 50
    guard_max_accuracy_drop: float = 0.05
    auto_promote: bool = False
    auto_promote_min_feedback: int = 200
    auto_promote_probability: float = 0.95
    # Trust (issue 21): signs prediction ids and keys an unnamed admin's fingerprint in the
    # deployment history; required like API_KEY. Never logged, never shown.
    secret_key: str = ""
    feedback_max_age_seconds: int = 7 * 86_400  # how long an answer can still be judged
    # Evidence rules: no key more than this share of any statistic the guard, the bandit,
    # auto-promotion or the retrain holdout read; and at least this many distinct keys.
    evidence_max_share_per_key: float = 0.2
    evidence_min_keys: int = 5
    # Feedback store (mnist_api/storage/db.py): DATABASE_URL, or "" for the embedded SQLite file.
    database_url: str = ""
    database_timeout_seconds: float = 3.0
    # Feedback retention (0 = no limit): ~2.3 KB per row in PostgreSQL, so 100,000 rows are
    # ~230 MB, inside a 1 GB Heroku Postgres plan next to everything else.
    feedback_retention_days: int = 365
    feedback_max_rows: int = 100_000
    # Server (read by gunicorn.conf.py)
    port: int = 8000
    web_concurrency: int = 2
    threads: int = 4
    timeout: int = 25
    # A worker is recycled after this many requests (plus up to 10% jitter): about 2 hours
    # of a worker's share of 1,400 answers a second, so a recycle is rare (README).
    max_requests: int = 5_000_000
    # Seconds an idle kept-alive connection is kept (closed at once for a waiting client).
    keepalive: int = 2
    # A client must send its request head within this many seconds of connecting (or of its
    # first byte on a kept-alive connection), and its body within this many more; slower
    # ones get 408 (mnist_api/serving/gunicorn_worker.py reads requests before a thread
    # serves them).
    request_header_timeout: float = 10.0
    request_body_timeout: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        keys = _list(env, "API_KEYS") or _list(env, "API_KEY")
        admin_keys, admin_names = _admin_keys(env)
        return cls(
            api_keys=keys,
            models_dir=Path(_text(env, "MODELS_DIR", str(cls.models_dir))),
            default_model_version=_text(env, "DEFAULT_MODEL_VERSION", ""),
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", cls.max_content_length, 1),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", cls.max_image_pixels, 1),
            batch_max_files=_int(env, "BATCH_MAX_FILES", cls.batch_max_files, 1),
            v2_max_pixels_batch=_int(env, "V2_MAX_PIXELS_BATCH", cls.v2_max_pixels_batch, 1),
            decode_memory_budget_mb=_int(
                env, "DECODE_MEMORY_BUDGET_MB", cls.decode_memory_budget_mb, 1
            ),
            decode_wait_seconds=_float(env, "DECODE_WAIT_SECONDS", cls.decode_wait_seconds),
            cors_origins=_list(env, "CORS_ORIGINS") or cls.cors_origins,
            redis_url=_text(env, "REDIS_URL", cls.redis_url),
            cache_ttl_seconds=_int(env, "CACHE_TTL_SECONDS", cls.cache_ttl_seconds, 1),
            cache_max_items=_int(env, "CACHE_MAX_ITEMS", cls.cache_max_items, 1),
            cache_socket_timeout=_float(env, "CACHE_SOCKET_TIMEOUT", cls.cache_socket_timeout),
            cache_retry_seconds=_float(env, "CACHE_RETRY_SECONDS", cls.cache_retry_seconds),
            result_expires_seconds=_int(
                env, "RESULT_EXPIRES_SECONDS", cls.result_expires_seconds, 1
            ),
            broker_visibility_timeout=_int(
                env, "BROKER_VISIBILITY_TIMEOUT", cls.broker_visibility_timeout, 1
            ),
            task_delay_seconds=_float(env, "TASK_DELAY_SECONDS", cls.task_delay_seconds),
            async_max_upload_bytes=_int(
                env, "ASYNC_MAX_UPLOAD_BYTES", cls.async_max_upload_bytes, 1
            ),
            async_queue_max_bytes=_int(env, "ASYNC_QUEUE_MAX_BYTES", cls.async_queue_max_bytes, 1),
            task_max_deliveries=_int(env, "TASK_MAX_DELIVERIES", cls.task_max_deliveries, 1),
            task_soft_time_limit=_int(env, "TASK_SOFT_TIME_LIMIT", cls.task_soft_time_limit, 0),
            task_time_limit=_int(env, "TASK_TIME_LIMIT", cls.task_time_limit, 0),
            task_crash_on_sha256=_text(env, "TASK_CRASH_ON_SHA256", "").lower(),
            local_jobs_dir=_text(env, "LOCAL_JOBS_DIR", ""),
            rate_limit=_rate_limit(env.get("RATE_LIMIT"), cls.rate_limit),
            proxy_fix_x_for=_int(env, "PROXY_FIX_X_FOR", cls.proxy_fix_x_for, 0),
            log_level=_text(env, "LOG_LEVEL", cls.log_level).upper(),
            log_format=_text(env, "LOG_FORMAT", cls.log_format).lower(),
            prometheus_multiproc_dir=_text(env, "PROMETHEUS_MULTIPROC_DIR", ""),
            metrics_token=_text(env, "METRICS_TOKEN", ""),
            low_confidence_threshold=_float(
                env, "LOW_CONFIDENCE_THRESHOLD", cls.low_confidence_threshold
            ),
            admin_api_keys=admin_keys,
            admin_names=admin_names,
            deployment_refresh_seconds=_float(
                env, "DEPLOYMENT_REFRESH_SECONDS", cls.deployment_refresh_seconds
            ),
            guard_min_requests=_int(env, "GUARD_MIN_REQUESTS", cls.guard_min_requests, 1),
            guard_max_low_confidence_delta=_float(
                env, "GUARD_MAX_LOW_CONFIDENCE_DELTA", cls.guard_max_low_confidence_delta
            ),
            guard_max_error_delta=_float(env, "GUARD_MAX_ERROR_DELTA", cls.guard_max_error_delta),
            guard_min_feedback=_int(env, "GUARD_MIN_FEEDBACK", cls.guard_min_feedback, 1),
            guard_max_accuracy_drop=_float(
                env, "GUARD_MAX_ACCURACY_DROP", cls.guard_max_accuracy_drop
            ),
            auto_promote=_text(env, "AUTO_PROMOTE", "0").lower() in ("1", "true", "yes", "on"),
            auto_promote_min_feedback=_int(
                env, "AUTO_PROMOTE_MIN_FEEDBACK", cls.auto_promote_min_feedback, 1
            ),
            auto_promote_probability=_float(
                env, "AUTO_PROMOTE_PROBABILITY", cls.auto_promote_probability
            ),
            secret_key=_text(env, "SECRET_KEY", ""),
            feedback_max_age_seconds=_int(
                env, "FEEDBACK_MAX_AGE_SECONDS", cls.feedback_max_age_seconds, 1
            ),
            evidence_max_share_per_key=_float(
                env, "EVIDENCE_MAX_SHARE_PER_KEY", cls.evidence_max_share_per_key
            ),
            evidence_min_keys=_int(env, "EVIDENCE_MIN_KEYS", cls.evidence_min_keys, 1),
            database_url=_text(env, "DATABASE_URL", ""),
            database_timeout_seconds=_float(
                env, "DATABASE_TIMEOUT_SECONDS", cls.database_timeout_seconds
            ),
            feedback_retention_days=_int(
                env, "FEEDBACK_RETENTION_DAYS", cls.feedback_retention_days, 0
            ),
            feedback_max_rows=_int(env, "FEEDBACK_MAX_ROWS", cls.feedback_max_rows, 0),
            port=_int(env, "PORT", cls.port, 1),
            web_concurrency=_int(env, "WEB_CONCURRENCY", cls.web_concurrency, 1),
            threads=_int(env, "GUNICORN_THREADS", cls.threads, 1),
            timeout=_int(env, "GUNICORN_TIMEOUT", cls.timeout, 1),
            max_requests=_int(env, "GUNICORN_MAX_REQUESTS", cls.max_requests, 0),
            keepalive=_int(env, "GUNICORN_KEEPALIVE", cls.keepalive, 1),
            request_header_timeout=_float(
                env, "REQUEST_HEADER_TIMEOUT", cls.request_header_timeout
            ),
            request_body_timeout=_float(env, "REQUEST_BODY_TIMEOUT", cls.request_body_timeout),
        )

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
