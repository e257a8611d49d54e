"""The service layer: upload bytes in, the contract's prediction object out.

Views call this; it owns the order of work (decode and preprocess, then one model call for
the whole batch) so the HTTP layer holds no NumPy and the worker can reuse it as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_api.errors import NotReady, ServiceError
from mnist_api.model import DigitModel
from mnist_api.preprocessing import Limits, preprocess

Prediction = dict[str, Any]

# Six decimals keep the ten probabilities summing to 1 within 1e-5.
DECIMALS = 6


@dataclass
class PredictionService:
    """Turns uploads into predictions with one model and one set of limits."""

    model: DigitModel
    limits: Limits

    @property
    def model_version(self) -> str:
        """The `model_version` every answer carries."""
        return self.model.full_version

    def predict(self, data: bytes) -> Prediction:
        """Predict one upload; raises a `ServiceError` subclass for a bad upload."""
        self._require_ready()
        image = preprocess(data, self.limits)
        return self._shape(self.model.predict(image[np.newaxis])[0])

    def predict_many(self, uploads: list[bytes]) -> list[Prediction | ServiceError]:
        """Predict a batch in one interpreter call; a bad upload yields its error in place."""
        self._require_ready()
        results: list[Prediction | ServiceError] = []
        images: list[np.ndarray] = []
        slots: list[int] = []
        for data in uploads:
            try:
                images.append(preprocess(data, self.limits))
            except ServiceError as error:
                results.append(error)
                continue
            slots.append(len(results))
            results.append({})  # filled below, once the model has run on every good image
        if images:
            probabilities = self.model.predict(np.stack(images))
            for slot, row in zip(slots, probabilities, strict=True):
                results[slot] = self._shape(row)
        return results

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
