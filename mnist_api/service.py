"""The service layer: upload bytes in, the contract's prediction object out.

Views call this; it owns the order of work (hash, look up the cache, decode and preprocess
the misses, one model call for all of them, store the answers) so the HTTP layer holds no
NumPy and the Celery worker can reuse it as is.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mnist_api import metrics
from mnist_api.cache import PredictionCache, cache_key
from mnist_api.errors import NotReady, ServiceError
from mnist_api.model import DigitModel
from mnist_api.preprocessing import Limits, preprocess, warm_up_upload

Prediction = dict[str, Any]

# Six decimals keep the ten probabilities summing to 1 within 1e-5.
DECIMALS = 6


@dataclass
class PredictionService:
    """Turns uploads into predictions with one model, one cache and one set of limits."""

    model: DigitModel
    limits: Limits
    cache: PredictionCache
    low_confidence_threshold: float = 0.6

    @property
    def model_version(self) -> str:
        """The `model_version` every answer carries."""
        return self.model.full_version

    def warm_up(self) -> None:
        """Run one upload through decoding and the model, uncounted and uncached.

        Also loads every Pillow plugin now: the check that names a refused file's kind
        (PDF, TIFF, ...) would otherwise import them all during some client's request.
        """
        Image.init()
        self.model.predict(preprocess(warm_up_upload(), self.limits)[np.newaxis])

    def lookup(self, data: bytes) -> Prediction | None:
        """The cached answer for an upload, or None; nothing is decoded."""
        self._require_ready()
        hit = self.cache.get_many([self.key_for(data)])[0]
        return {**hit, "cached": True} if hit is not None else None

    def validate(self, data: bytes) -> None:
        """Raise the error /predict would give for this upload, without running the model."""
        preprocess(data, self.limits)

    def key_for(self, data: bytes) -> str:
        """The cache key of an upload: model version and SHA-256 of the bytes as sent."""
        return cache_key(self.model_version, hashlib.sha256(data).hexdigest())

    def predict(self, data: bytes) -> Prediction:
        """Predict one upload; raises a `ServiceError` subclass for a bad upload."""
        result = self.predict_many([data])[0]
        if isinstance(result, ServiceError):
            raise result
        return result

    def predict_many(self, uploads: list[bytes]) -> list[Prediction | ServiceError]:
        """Predict a batch: one cache round trip, one interpreter call for all the misses.

        A bad upload yields its error in its place; identical uploads are computed once.
        """
        self._require_ready()
        keys = [self.key_for(data) for data in uploads]
        results: list[Prediction | ServiceError | None] = [
            {**hit, "cached": True} if hit is not None else None
            for hit in self.cache.get_many(keys)
        ]
        pending: dict[str, list[int]] = {}  # key -> the slots waiting for its answer
        images: list[np.ndarray] = []
        for slot, (data, key) in enumerate(zip(uploads, keys, strict=True)):
            if results[slot] is not None:
                continue
            if key in pending:
                pending[key].append(slot)
                continue
            started = time.perf_counter()
            try:
                images.append(preprocess(data, self.limits))
            except ServiceError as error:
                results[slot] = error
                continue
            finally:
                metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
            pending[key] = [slot]
        if images:
            fresh: dict[str, Prediction] = {}
            started = time.perf_counter()
            probabilities = self.model.predict(np.stack(images))
            metrics.INFERENCE_SECONDS.labels(model_version=self.model_version).observe(
                time.perf_counter() - started
            )
            for (key, slots), row in zip(pending.items(), probabilities, strict=True):
                answer = self._shape(row)
                fresh[key] = answer
                for slot in slots:
                    results[slot] = answer
            self.cache.set_many(fresh)
        answered = [result for result in results if result is not None]
        assert len(answered) == len(uploads), "every upload gets an answer or an error"
        metrics.record_answers(
            [item for item in answered if isinstance(item, dict)], self.low_confidence_threshold
        )
        return answered

    def _require_ready(self) -> None:
        if not self.model.ready:
            raise NotReady()

    def _shape(self, probabilities: np.ndarray) -> Prediction:
        digit = int(np.argmax(probabilities))
        rounded = [round(float(p), DECIMALS) for p in probabilities]
        return {
            "prediccion": digit,
            "probabilidad": rounded[digit],
            "probabilities": rounded,
            "model_version": self.model_version,
            "cached": False,
        }
