"""The feedback store: what users say the right digit was, per key, image and version.

Kept per feedback: the normalised 28x28 input the model saw (float16 bytes), its digest
(`mnist_api.inference.prediction_ids.input_digest`, in the `sha256` column: rows written before
issue 21 hold the upload's SHA-256 there), the label, the prediction (and its probability),
the version, the key fingerprint and the time. The raw upload is never kept. The same key
judging the same pixels' answer by the same version again replaces its earlier label, so
the same pixels count once per key whatever bytes carried them.

Every write is one transaction: a database that is down, locked or slow raises
`FeedbackUnavailable` (503) and leaves nothing half-written.

Retention (issue 22): a row costs about 2.3 KB in PostgreSQL (measured: 2,048 bytes of
heap, as a row's 1,568 bytes of pixels leave room for 4 rows a page, and 228 bytes of index),
so the table is kept to `FEEDBACK_MAX_ROWS` rows and `FEEDBACK_RETENTION_DAYS` days, oldest
first: each process prunes at most once a minute, after a new row, and
`python -m mnist_api.db prune` does it by hand. Stats are one GROUP BY in SQL and the
retrain streams the rows: neither holds the table in memory as Python objects.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger
from sqlalchemy import Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mnist_api.config import Settings
from mnist_api.errors import FeedbackUnavailable
from mnist_api.storage.db import build_engine
from mnist_api.storage.tables import feedback

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
    # The deployment chose the version (False: pinned by the client); from the prediction id.
    routed: bool = False

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
    # (n,) bool: the judged answer was routed by the deployment (only those may be held out
    # to gate a retrain); all False when unknown (an export made before this field).
    routed: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Retention:
    """How much feedback is kept (FEEDBACK_RETENTION_DAYS, FEEDBACK_MAX_ROWS; 0 = no limit),
    and how often one process prunes at most."""

    max_age_days: int = 365
    max_rows: int = 100_000
    every_seconds: float = 60.0


def retention(settings: Settings) -> Retention:
    """The retention of the environment (FEEDBACK_RETENTION_DAYS, FEEDBACK_MAX_ROWS)."""
    return Retention(settings.feedback_retention_days, settings.feedback_max_rows)


class FeedbackStore:
    """Feedback rows in the SQL database at DATABASE_URL (or the embedded SQLite file)."""

    def __init__(self, engine: Engine, retention: Retention | None = None) -> None:
        self.engine = engine
        self.embedded = engine.dialect.name == "sqlite"
        self.retention = retention or Retention()
        self._pruned_at = -float("inf")
        self._prune_lock = threading.Lock()

    @classmethod
    def from_url(
        cls, url: str, timeout: float = 3.0, retention: Retention | None = None
    ) -> FeedbackStore:
        """A store on DATABASE_URL; nothing connects until the first use."""
        return cls(build_engine(url, timeout), retention)

    def record(self, entry: FeedbackEntry) -> Recorded:
        """Insert the feedback, or replace the same key's label for this image and version."""
        for attempt in range(2):
            try:
                recorded = self._upsert(entry)
                if recorded.created:
                    self._maybe_prune()
                return recorded
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
            "routed": entry.routed,
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

    def prune(self, now: datetime.datetime | None = None) -> int:
        """Delete what the retention does not keep: rows last updated more than
        `max_age_days` ago, then all but the newest `max_rows`. The number deleted."""
        now = now or datetime.datetime.now(datetime.UTC)
        deleted = 0
        with self.engine.begin() as connection:
            if self.retention.max_age_days:
                oldest = now - datetime.timedelta(days=self.retention.max_age_days)
                deleted += connection.execute(
                    delete(feedback).where(feedback.c.updated_at < oldest)
                ).rowcount
            if self.retention.max_rows:
                # The newest row that goes: found by the updated_at index, then everything
                # older than it (ties broken by id) in one DELETE.
                cutoff = connection.execute(
                    select(feedback.c.updated_at, feedback.c.id)
                    .order_by(feedback.c.updated_at.desc(), feedback.c.id.desc())
                    .offset(self.retention.max_rows)
                    .limit(1)
                ).first()
                if cutoff is not None:
                    deleted += connection.execute(
                        delete(feedback).where(
                            or_(
                                feedback.c.updated_at < cutoff[0],
                                and_(
                                    feedback.c.updated_at == cutoff[0], feedback.c.id <= cutoff[1]
                                ),
                            )
                        )
                    ).rowcount
        return deleted

    def _maybe_prune(self) -> None:
        """Prune at most every `every_seconds` per process; a failure never fails the write
        that was just committed (the next one tries again)."""
        if not (self.retention.max_age_days or self.retention.max_rows):
            return
        now = time.monotonic()
        if now - self._pruned_at < self.retention.every_seconds:
            return
        if not self._prune_lock.acquire(blocking=False):
            return  # another thread of this process is at it
        try:
            self._pruned_at = now
            deleted = self.prune()
            if deleted:
                logger.info("feedback retention deleted {} rows", deleted)
        except SQLAlchemyError as error:
            logger.warning("feedback retention skipped: {}", type(error).__name__)
        finally:
            self._prune_lock.release()

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

    def rows(self, chunk: int = 1000) -> FeedbackRows:
        """Every feedback row, oldest first: what the retraining pipeline reads.

        Streamed `chunk` rows at a time (a server-side cursor on PostgreSQL) into arrays
        allocated once for the row count: the table is never held as Python objects, only
        as the arrays the training needs (3.1 KB of float32 pixels per row).
        """
        query = select(
            feedback.c.input,
            feedback.c.label,
            feedback.c.predicted,
            feedback.c.model_version,
            feedback.c.key_fingerprint,
            feedback.c.sha256,
            feedback.c.updated_at,
            feedback.c.routed,
        ).order_by(feedback.c.updated_at, feedback.c.id)
        with self.engine.connect() as connection:
            # Rows inserted while streaming are left for the next run: the arrays are sized
            # for the rows up to the highest id seen now.
            count, last_id = connection.execute(select(func.count(), func.max(feedback.c.id))).one()
            images = np.zeros((count, 28, 28), np.float32)
            labels = np.zeros(count, np.int64)
            predicted = np.zeros(count, np.int64)
            versions = np.zeros(count, "<U12")
            fingerprints = np.zeros(count, "<U16")
            sha256 = np.zeros(count, "<U64")
            times = np.zeros(count, np.float64)
            routed = np.zeros(count, bool)
            filled = 0
            if count:
                streamed = connection.execution_options(
                    stream_results=True, yield_per=chunk
                ).execute(query.where(feedback.c.id <= last_id))
                for row in streamed:
                    if filled == count:
                        break
                    images[filled] = decode_input(row[0])
                    labels[filled], predicted[filled] = row[1], row[2]
                    versions[filled], fingerprints[filled], sha256[filled] = row[3], row[4], row[5]
                    times[filled] = _timestamp(row[6])
                    routed[filled] = bool(row[7])
                    filled += 1
                streamed.close()
        # Fewer when retention deleted some in between.
        return FeedbackRows(
            images=images[:filled],
            labels=labels[:filled],
            predicted=predicted[:filled],
            versions=versions[:filled],
            key_fingerprints=fingerprints[:filled],
            sha256=sha256[:filled],
            times=times[:filled],
            routed=routed[:filled],
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
