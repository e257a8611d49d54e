"""Accessors for the shared services kept in `app.extensions` (no module globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

# Only types: this module sits below the services it hands out (routes and Celery tasks call
# it), so importing them at run time would climb back up the layers (checked by import-linter).
if TYPE_CHECKING:
    from mnist_api.config import Settings
    from mnist_api.deployment.manager import DeploymentManager
    from mnist_api.deployment.router import DeploymentRouter
    from mnist_api.feedback.store import FeedbackStore
    from mnist_api.inference.cache import PredictionCache
    from mnist_api.inference.model import DigitModel
    from mnist_api.inference.registry import ModelRegistry
    from mnist_api.inference.service import PredictionService
    from mnist_api.jobs.service import JobService
    from mnist_api.jobs.store import JobStore

SETTINGS = "mnist_settings"
REGISTRY = "mnist_registry"
SERVICE = "mnist_service"
CACHE = "mnist_cache"
JOB_STORE = "mnist_job_store"
JOBS = "mnist_jobs"
DEPLOYMENTS = "mnist_deployments"
ROUTER = "mnist_router"
FEEDBACK = "mnist_feedback"


def get_settings() -> Settings:
    """The settings the app was built with."""
    settings: Settings = current_app.extensions[SETTINGS]
    return settings


def get_registry() -> ModelRegistry:
    """The installed model versions."""
    registry: ModelRegistry = current_app.extensions[REGISTRY]
    return registry


def get_model() -> DigitModel:
    """The stable version's model (what answers when nothing else is asked for)."""
    return get_service().model


def get_service() -> PredictionService:
    """This app's prediction service."""
    service: PredictionService = current_app.extensions[SERVICE]
    return service


def get_cache() -> PredictionCache:
    """This app's prediction cache."""
    cache: PredictionCache = current_app.extensions[CACHE]
    return cache


def get_job_store() -> JobStore:
    """Where async jobs keep uploads and issued ids."""
    store: JobStore = current_app.extensions[JOB_STORE]
    return store


def get_jobs() -> JobService:
    """This app's async job service."""
    jobs: JobService = current_app.extensions[JOBS]
    return jobs


def get_deployments() -> DeploymentManager:
    """Reads and changes the deployment (admin routes)."""
    manager: DeploymentManager = current_app.extensions[DEPLOYMENTS]
    return manager


def get_router() -> DeploymentRouter:
    """This process's deployment router (the feedback route calls `record_feedback`)."""
    router: DeploymentRouter = current_app.extensions[ROUTER]
    return router


def get_feedback_store() -> FeedbackStore:
    """Where feedback is stored (the SQL database)."""
    store: FeedbackStore = current_app.extensions[FEEDBACK]
    return store
