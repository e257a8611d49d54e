"""Feedback orchestration: check the label and the prediction id, re-score the upload with the
version that answered, store the judgement and count it (metrics, the deployment's evidence).

The route only reads the form and shapes the JSON; everything else happens here, in the same
order as before, so the same bad request still gets the same error first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_api import metrics
from mnist_api.errors import InvalidLabel, InvalidPredictionId, PredictionMismatch
from mnist_api.feedback.store import FeedbackEntry, FeedbackStore
from mnist_api.imaging.digest import upload_sha256
from mnist_api.inference.model import full_version
from mnist_api.inference.prediction_ids import input_digest
from mnist_api.inference.service import PredictionService


def parse_label(raw: str | None) -> int:
    """The form's `label` as a digit; `InvalidLabel` (400) when missing or not 0..9."""
    text = (raw or "").strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 9:
        raise InvalidLabel()
    return int(text)


@dataclass(frozen=True)
class Receipt:
    """What POST /feedback answers: the body, whether the row is new, the version credited."""

    body: dict[str, Any]
    created: bool
    model_version: str


@dataclass
class FeedbackService:
    """Judges answers: one call per POST /feedback, one per GET /feedback/stats."""

    predictions: PredictionService
    store: FeedbackStore

    def submit(
        self,
        *,
        label: str | None,
        prediction_id: str,
        read_upload: Callable[[], bytes],
        client: str,
    ) -> Receipt:
        """Store the right `label` for the answer `prediction_id` named, replacing this key's
        earlier label for the same input and version.

        `read_upload` reads the image only after the label and the id passed, so a request
        bad in both ways still gets `invalid_label` / `invalid_prediction_id` first.
        """
        digit = parse_label(label)
        service = self.predictions
        if service.ids is None:
            raise InvalidPredictionId()  # unreachable in the app: create_app always signs
        answered = service.ids.verify(prediction_id.strip(), client)
        data = read_upload()
        model, image, probabilities = service.score_for_feedback(
            data, client=client, version=answered.version
        )
        digest = input_digest(image)
        if digest != answered.input_digest:
            raise PredictionMismatch()
        predicted = int(np.argmax(probabilities))
        entry = FeedbackEntry(
            key_fingerprint=client,
            # The store's per-key row is per normalised input, not per upload: the same pixels
            # in other bytes (a PNG with another text chunk) judge the same answer again.
            sha256=digest,
            model_version=model.version,
            label=digit,
            predicted=predicted,
            probability=float(probabilities[predicted]),
            image=image,
            routed=answered.routed,
        )
        recorded = self.store.record(entry)
        if recorded.created:
            # A replaced label is not a new judgement: counting it again would let one key
            # move the accuracy (and the bandit) by repeating itself.
            metrics.record_feedback(model.full_version, entry.correct)
            if answered.routed:  # a pinned answer is not evidence for the deployment
                service.router.record_feedback(
                    model.version, entry.correct, client=client, deployment=answered.deployment
                )
        body = {
            "feedback_id": recorded.feedback_id,
            "sha256": upload_sha256(data),
            "input_digest": digest,
            "label": digit,
            "model_version": model.full_version,
            "predicted": predicted,
            "correct": entry.correct,
        }
        return Receipt(body, recorded.created, model.full_version)

    def stats(self) -> dict[str, Any]:
        """Count, accuracy and 10x10 confusion matrix of the feedback per version."""
        return {
            "versions": [
                {"model_version": full_version(entry["version"]), **entry}
                for entry in self.store.stats()
            ]
        }
