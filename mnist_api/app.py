"""The application factory: `create_app()` builds the Flask (APIFlask) application."""

from __future__ import annotations

from typing import Any

from apiflask import APIFlask
from flask.json.provider import DefaultJSONProvider
from loguru import logger
from sqlalchemy import Engine

from mnist_api import extensions, metrics
from mnist_api.config import PROJECT_ROOT, Settings
from mnist_api.deployment.counts import AutoPromote
from mnist_api.deployment.evidence import EvidenceRules
from mnist_api.deployment.manager import DeploymentManager, guard_defaults
from mnist_api.deployment.notify import ChangeNotifier
from mnist_api.deployment.router import DeploymentRouter
from mnist_api.deployment.store import SqlDeploymentStore
from mnist_api.feedback.store import FeedbackStore, retention
from mnist_api.http import cors, http_metrics, json_limits, rate_limits, request_context, schemas
from mnist_api.http import handlers as error_handlers
from mnist_api.imaging.native_memory import return_large_blocks_to_os
from mnist_api.imaging.preprocessing import ALLOWED_CONTENT_TYPES
from mnist_api.inference.cache import CacheHooks, build_cache
from mnist_api.inference.model import full_version
from mnist_api.inference.prediction_ids import PredictionIds
from mnist_api.inference.registry import ModelRegistry
from mnist_api.inference.service import PredictionService, limits_from
from mnist_api.jobs import tasks as _tasks  # noqa: F401 - registers the task bodies with Celery
from mnist_api.jobs.celery_app import celery_init_app
from mnist_api.jobs.service import JobService
from mnist_api.jobs.store import build_job_store
from mnist_api.logs import configure_logging
from mnist_api.routes import api, feedback, ops, v2, web
from mnist_api.routes import deployment as deployment_routes
from mnist_api.storage.db import build_engine

API_VERSION = "1.0.0"


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, except that a request body is measured before it is parsed.

    `request.get_json()` on any route goes through `loads`: a body nested deeper than
    `json_limits.MAX_DEPTH` or holding more than `json_limits.MAX_VALUES` values is a 400
    (`json_too_deep`, `json_too_large`) even with `silent=True`, never the parser's
    `RecursionError` as a 500.
    """

    sort_keys = False  # clients read keys in order

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse a JSON text within the limits of `json_limits`."""
        return json_limits.loads(s, **kwargs)


def create_app(settings: Settings | None = None, *, load_model: bool = True) -> APIFlask:
    """Build the app from `settings` (default: the environment) and load every model version.

    Under gunicorn this runs in each worker after the fork (the app is not preloaded), so
    every worker process loads its own interpreters. `load_model=False` leaves the models
    unloaded, which tests use to see the not-ready state.
    """
    settings = settings or Settings.from_env()
    settings.validate()
    configure_logging(settings.log_level, settings.log_format)

    app = APIFlask(
        __name__,
        # The page lives at the top of the repository, next to the package.
        template_folder=str(PROJECT_ROOT / "templates"),
        static_folder=str(PROJECT_ROOT / "static"),
        title="MNIST digit prediction API",
        version=API_VERSION,
        spec_path="/openapi.json",
        docs_path="/docs",
    )
    app.config.update(_flask_config(settings))
    app.json = BoundedJSONProvider(app)
    app.extensions[extensions.SETTINGS] = settings

    registry = ModelRegistry.discover(settings.models_dir)
    app.extensions[extensions.REGISTRY] = registry
    cache = build_cache(
        settings, CacheHooks(metrics.record_cache_lookups, metrics.set_cache_degraded)
    )
    app.extensions[extensions.CACHE] = cache
    return_large_blocks_to_os()  # so the decode budget bounds the worker's real memory
    # One pool for the feedback and the deployment (both in DATABASE_URL). It connects
    # lazily: a database that is down costs /feedback and admin changes a 503, never the
    # start, and the workers keep serving the deployment they last read.
    engine = build_engine(settings.database_url, settings.database_timeout_seconds)
    router = _deployment_router(app, settings, registry, engine)
    service = app.extensions[extensions.SERVICE] = PredictionService(
        registry,
        limits_from(settings),
        cache,
        router,
        low_confidence_threshold=settings.low_confidence_threshold,
        ids=PredictionIds(settings.secret_key, settings.feedback_max_age_seconds),
    )

    app.extensions[extensions.JOB_STORE] = job_store = build_job_store(settings)
    app.extensions[extensions.JOBS] = JobService(
        service,
        job_store,
        celery_init_app(app, settings),
        max_upload_bytes=settings.async_max_upload_bytes,
    )
    app.extensions[extensions.FEEDBACK] = FeedbackStore(engine, retention(settings))

    cors.init_app(app, settings.cors_origins)
    request_context.init_app(app)
    error_handlers.init_app(app)
    # The keyed routes count against the same per-key limit.
    rate_limits.init_app(app, settings, limited=(api.bp, v2.bp, deployment_routes.bp, feedback.bp))
    http_metrics.init_app(
        app,
        multiprocess=bool(settings.prometheus_multiproc_dir),
        token=settings.metrics_token,
    )
    app.register_blueprint(api.bp)
    app.register_blueprint(feedback.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(v2.public_bp)
    app.register_blueprint(v2.bp)
    app.register_blueprint(deployment_routes.bp)
    app.spec_processor(_document_raw_uploads)

    if load_model:
        registry.load()
        service.warm_up()
        for model in registry:
            if model.card_mismatch():
                logger.warning("model card of {} does not describe its file", model.version)
        metrics.set_model_version(service.model_version)
        metrics.init_feedback([model.full_version for model in registry])
        logger.info(
            "model {} loaded and warmed up ({} installed: {})",
            service.model_version,
            len(registry.versions()),
            ", ".join(registry.versions()),
        )
    metrics.prepare_versions([full_version(version) for version in registry.versions()])
    router.start()
    return app


def _deployment_router(
    app: APIFlask, settings: Settings, registry: ModelRegistry, engine: Engine
) -> DeploymentRouter:
    """The deployment (in the database) and this worker's router."""
    # With Redis, a change is also announced there, so other workers need not wait a tick.
    notifier = ChangeNotifier(settings.redis_url) if settings.redis_url else None
    manager = DeploymentManager(
        SqlDeploymentStore(engine),
        tuple(registry.versions()),
        registry.default_version(settings.default_model_version),
        guard_defaults(settings),
        on_change=(lambda changed: notifier.publish(changed.id)) if notifier else None,
    )
    app.extensions[extensions.DEPLOYMENTS] = manager
    router = DeploymentRouter(
        manager,
        full_version=full_version,
        refresh_seconds=settings.deployment_refresh_seconds,
        auto_promote=AutoPromote(
            settings.auto_promote,
            settings.auto_promote_min_feedback,
            settings.auto_promote_probability,
        ),
        evidence=EvidenceRules(settings.evidence_max_share_per_key, settings.evidence_min_keys),
        notifier=notifier,
    )
    app.extensions[extensions.ROUTER] = router
    return router


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
    v2.document_openapi(spec)
    return spec
