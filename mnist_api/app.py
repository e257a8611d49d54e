"""The application factory: `create_app()` builds the Flask (APIFlask) application."""

from __future__ import annotations

from typing import Any

from apiflask import APIFlask
from flask_cors import CORS
from loguru import logger

from mnist_api import error_handlers, extensions, metrics, rate_limits, request_context, schemas
from mnist_api.cache import CacheHooks, build_cache
from mnist_api.config import Settings
from mnist_api.job_store import build_job_store
from mnist_api.jobs import JobService
from mnist_api.logs import configure_logging
from mnist_api.model import DigitModel
from mnist_api.preprocessing import ALLOWED_CONTENT_TYPES, Limits
from mnist_api.routes import api, ops, web
from mnist_api.service import PredictionService
from mnist_api.tasks import celery_init_app

API_VERSION = "1.0.0"


def create_app(settings: Settings | None = None, *, load_model: bool = True) -> APIFlask:
    """Build the app from `settings` (default: the environment) and load the model.

    Under gunicorn this runs in each worker after the fork (the app is not preloaded), so
    every worker process loads its own interpreter. `load_model=False` leaves the model
    unloaded, which tests use to see the not-ready state.
    """
    settings = settings or Settings.from_env()
    settings.validate()
    configure_logging(settings.log_level, settings.log_format)

    app = APIFlask(
        __name__,
        title="MNIST digit prediction API",
        version=API_VERSION,
        spec_path="/openapi.json",
        docs_path="/docs",
    )
    app.config.update(_flask_config(settings))
    app.json.sort_keys = False  # type: ignore[attr-defined]  # clients read keys in order
    app.extensions[extensions.SETTINGS] = settings

    model = DigitModel(settings.model_path, settings.model_card_path)
    app.extensions[extensions.MODEL] = model
    cache = build_cache(
        settings, CacheHooks(metrics.record_cache_lookups, metrics.set_cache_degraded)
    )
    app.extensions[extensions.CACHE] = cache
    service = app.extensions[extensions.SERVICE] = PredictionService(
        model,
        Limits(max_pixels=settings.max_image_pixels),
        cache,
        low_confidence_threshold=settings.low_confidence_threshold,
    )

    app.extensions[extensions.JOB_STORE] = job_store = build_job_store(settings)
    app.extensions[extensions.JOBS] = JobService(
        service,
        job_store,
        celery_init_app(app, settings),
        max_upload_bytes=settings.async_max_upload_bytes,
    )

    CORS(
        app,
        origins=list(settings.cors_origins),
        allow_headers=["x-api-key", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID", "X-Cache", "Retry-After", "Location"],
        max_age=600,
    )
    request_context.init_app(app)
    error_handlers.init_app(app)
    rate_limits.init_app(app, settings, limited=api.bp)
    metrics.init_app(
        app,
        multiprocess=bool(settings.prometheus_multiproc_dir),
        token=settings.metrics_token,
    )
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(web.bp)
    app.spec_processor(_document_raw_uploads)

    if load_model:
        model.load()
        service.warm_up()
        if model.card_mismatch():
            logger.warning("model card does not describe the loaded model file")
        metrics.set_model_version(model.full_version)
        logger.info("model {} loaded and warmed up", model.full_version)
    return app


def _flask_config(settings: Settings) -> dict[str, Any]:
    assets = web.SWAGGER_ASSETS
    return {
        "MAX_CONTENT_LENGTH": settings.max_content_length,
        # Error bodies use the contract's shape; none of APIFlask's validation errors occur.
        "HTTP_ERROR_SCHEMA": schemas.Error,
        "AUTO_VALIDATION_ERROR_RESPONSE": False,
        "AUTO_404_RESPONSE": False,
        # Swagger UI from the local package, not a CDN.
        "SWAGGER_UI_CSS": f"{assets}/swagger-ui.css",
        "SWAGGER_UI_BUNDLE_JS": f"{assets}/swagger-ui-bundle.js",
        "SWAGGER_UI_STANDALONE_PRESET_JS": f"{assets}/swagger-ui-standalone-preset.js",
        "DOCS_FAVICON": f"{assets}/favicon-32x32.png",
        "INFO": {
            "description": (
                "Predicts the handwritten digit in an image with an int8-quantized MNIST CNN. "
                "Send your key in the `x-api-key` header."
            )
        },
    }


METRICS_OPERATION = {
    "get": {
        "tags": ["Operations"],
        "summary": "Prometheus metrics, summed over all workers",
        "description": "Needs `Authorization: Bearer <METRICS_TOKEN>` when that is set.",
        "responses": {
            "200": {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "401": {
                "description": "METRICS_TOKEN is set and the bearer token is missing or wrong",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
}


def _document_raw_uploads(spec: dict[str, Any] | str) -> dict[str, Any] | str:
    """Add the raw-body alternative of /predict next to its generated multipart schema."""
    if isinstance(spec, str):  # only with SPEC_FORMAT = "yaml", which this app does not use
        return spec
    spec.setdefault("paths", {})["/metrics"] = METRICS_OPERATION
    operation = spec.get("paths", {}).get("/predict", {}).get("post")
    if operation is not None:
        content = operation.setdefault("requestBody", {}).setdefault("content", {})
        for mimetype in sorted(ALLOWED_CONTENT_TYPES):
            content[mimetype] = {"schema": {"type": "string", "format": "binary"}}
    return spec
