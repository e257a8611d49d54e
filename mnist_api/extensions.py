"""Accessors for the shared services kept in `app.extensions` (no module globals)."""

from __future__ import annotations

from flask import current_app

from mnist_api.cache import PredictionCache
from mnist_api.config import Settings
from mnist_api.model import DigitModel
from mnist_api.service import PredictionService

SETTINGS = "mnist_settings"
MODEL = "mnist_model"
SERVICE = "mnist_service"
CACHE = "mnist_cache"


def get_settings() -> Settings:
    """The settings the app was built with."""
    settings: Settings = current_app.extensions[SETTINGS]
    return settings


def get_model() -> DigitModel:
    """This app's model."""
    model: DigitModel = current_app.extensions[MODEL]
    return model


def get_service() -> PredictionService:
    """This app's prediction service."""
    service: PredictionService = current_app.extensions[SERVICE]
    return service


def get_cache() -> PredictionCache:
    """This app's prediction cache."""
    cache: PredictionCache = current_app.extensions[CACHE]
    return cache
