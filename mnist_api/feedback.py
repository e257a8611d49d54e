"""The feedback store: what users say the right digit was, per key, image and version.

Kept per feedback: the normalised 28x28 input the model saw (float16 bytes), its digest
(`mnist_api.prediction_ids.input_digest`, in the `sha256` column: rows written before
issue 21 hold the upload's SHA-256 there), the label, the prediction (and its probability),
the version, the key fingerprint and the time. The raw upload is never kept. The same key
judging the same pixels' answer by the same version again replaces its earlier label, so
the same pixels count once per key whatever bytes carried them.

Every write is one transaction: a database that is down, locked or slow raises
`FeedbackUnavailable` (503) and leaves nothing half-written.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mnist_api.db import build_engine
from mnist_api.errors import FeedbackUnavailable
from mnist_api.tables import feedback

NUM_CLASSES = 10
INPUT_DTYPE = np.dtype("<f2")  # half precision keeps the [0, 1] pixels to ~1e-3


def encode_input(image: np.ndarray) -> bytes:
    """The 28x28 model input as the bytes stored in the `input` column."""
    return np.asarray(image, dtype=np.float32).reshape(28, 28).astype(INPUT_DTYPE).tobytes()


def decode_input(data: bytes) -> np.ndarray:
    """The stored bytes back as a float32 (28, 28) image in [0, 1]."""
    return np.frombuffer(data, dtype=INPUT_DTYPE).reshape(28, 28).astype(np.float32)


@dataclass(frozen=True)
class FeedbackEntry:
    """One judgement of an answer: what the model saw and said, and the right label."""

    key_fingerprint: str
    sha256: str  # the normalised input's digest (the per-key dedupe key; column `sha256`)
    model_version: str  # the short 12-hex version id
    label: int
    predicted: int
    probability: float
    image: np.ndarray  # (28, 28) float32, the preprocessed input

    @property
    def correct(self) -> bool:
        """True when the model's answer was the label."""
        return self.label == self.predicted


@dataclass(frozen=True)
class Recorded:
    """The stored row's id, and whether it is new (201) or replaced an earlier label (200)."""

    feedback_id: int
    created: bool


@dataclass(frozen=True)
class FeedbackRows:
    """Every stored feedback, oldest first (by last update), as arrays (the retrain input)."""

    images: np.ndarray  # (n, 28, 28) float32
    labels: np.ndarray  # (n,) int64
    predicted: np.ndarray  # (n,) int64
    versions: np.ndarray  # (n,) str
    key_fingerprints: np.ndarray  # (n,) str
    sha256: np.ndarray  # (n,) str
    times: np.ndarray  # (n,) float64, seconds since the epoch

    def __len__(self) -> int:
        return len(self.labels)


class FeedbackStore:
    """Feedback rows in the SQL database at DATABASE_URL (or the embedded SQLite file)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.embedded = engine.dialect.name == "sqlite"

    @classmethod
    def from_url(cls, url: str, timeout: float = 3.0) -> FeedbackStore:
        """A store on DATABASE_URL; nothing connects until the first use."""
        return cls(build_engine(url, timeout))

    def record(self, entry: FeedbackEntry) -> Recorded:
        """Insert the feedback, or replace the same key's label for this image and version."""
        for attempt in range(2):
            try:
                return self._upsert(entry)
            except IntegrityError:
                # Two requests inserted the same (key, image, version) at once: the loser
                # retries, finds the winner's row and replaces its label.
                if attempt:
                    raise FeedbackUnavailable() from None
            except SQLAlchemyError as error:
                logger.warning("feedback store unavailable: {}", type(error).__name__)
                raise FeedbackUnavailable() from None
        raise AssertionError("unreachable")

    def _upsert(self, entry: FeedbackEntry) -> Recorded:
        now = datetime.datetime.now(datetime.UTC)
        values = {
            "label": entry.label,
            "predicted": entry.predicted,
            "correct": entry.correct,
            "probability": float(entry.probability),
            "input": encode_input(entry.image),
            "updated_at": now,
        }
        with self.engine.begin() as connection:
            existing = connection.execute(
                select(feedback.c.id).where(
                    feedback.c.key_fingerprint == entry.key_fingerprint,
                    feedback.c.sha256 == entry.sha256,
                    feedback.c.model_version == entry.model_version,
                )
            ).scalar_one_or_none()
            if existing is not None:
                connection.execute(update(feedback).where(feedback.c.id == existing).values(values))
                return Recorded(int(existing), created=False)
            result = connection.execute(
                insert(feedback).values(
                    key_fingerprint=entry.key_fingerprint,
                    sha256=entry.sha256,
                    model_version=entry.model_version,
                    created_at=now,
                    **values,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return Recorded(int(key[0]), created=True)

    def stats(self) -> list[dict[str, Any]]:
        """Per version: count, correct answers, accuracy and the 10x10 confusion matrix.

        `confusion[label][predicted]` counts the feedback with that label and prediction.
        """
        query = select(
            feedback.c.model_version, feedback.c.label, feedback.c.predicted, func.count()
        ).group_by(feedback.c.model_version, feedback.c.label, feedback.c.predicted)
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
        except SQLAlchemyError as error:
            logger.warning("feedback store unavailable: {}", type(error).__name__)
            raise FeedbackUnavailable() from None
        matrices: dict[str, np.ndarray] = {}
        for version, label, predicted, count in rows:
            matrix = matrices.setdefault(version, np.zeros((NUM_CLASSES, NUM_CLASSES), int))
            matrix[label, predicted] += count
        return [
            {
                "version": version,
                "count": int(matrix.sum()),
                "correct": int(np.trace(matrix)),
                "accuracy": round(float(np.trace(matrix) / matrix.sum()), 4),
                "confusion": matrix.tolist(),
            }
            for version, matrix in sorted(matrices.items())
        ]

    def rows(self) -> FeedbackRows:
        """Every feedback row, oldest first: what the retraining pipeline reads."""
        query = select(
            feedback.c.input,
            feedback.c.label,
            feedback.c.predicted,
            feedback.c.model_version,
            feedback.c.key_fingerprint,
            feedback.c.sha256,
            feedback.c.updated_at,
        ).order_by(feedback.c.updated_at, feedback.c.id)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return FeedbackRows(
            images=np.stack([decode_input(r[0]) for r in rows])
            if rows
            else np.zeros((0, 28, 28), np.float32),
            labels=np.array([r[1] for r in rows], dtype=np.int64),
            predicted=np.array([r[2] for r in rows], dtype=np.int64),
            versions=np.array([r[3] for r in rows], dtype=str),
            key_fingerprints=np.array([r[4] for r in rows], dtype=str),
            sha256=np.array([r[5] for r in rows], dtype=str),
            times=np.array([_timestamp(r[6]) for r in rows], dtype=np.float64),
        )

    def status(self) -> str:
        """For /readyz: "ok" (server database), "sqlite" (embedded file) or "down"."""
        try:
            with self.engine.connect() as connection:
                connection.execute(select(feedback.c.id).limit(1)).all()
        except SQLAlchemyError as error:
            where = self.engine.url.render_as_string(hide_password=True)
            logger.warning("feedback store {} is down: {}", where, type(error).__name__)
            return "down"
        return "sqlite" if self.embedded else "ok"

    def dispose(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()


def _timestamp(value: datetime.datetime) -> float:
    """Seconds since the epoch; SQLite hands naive datetimes back (they were stored in UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value.timestamp()
