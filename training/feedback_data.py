"""Feedback as training data: read it (database or exported .npz), split off the newest for
the gate, and weigh it so that a few hundred examples matter and no key outvotes the rest.

Rules (stated here once, recorded in the report):
- One example per (key fingerprint, image SHA-256): a key judging the same upload for two
  versions gave one label for one image; its newest label wins.
- The newest `holdout_fraction` of each key's examples (by time) is held out for gate (b); the
  challenger never trains on them, nor on any other example of the same image. The holdout
  is capped per key like the training weight: no key weighs more than `max_key_share`
  (EVIDENCE_MAX_SHARE_PER_KEY, 0.2) of its accuracy (a key over the cap weighs cap / n per
  example), and a holdout from fewer than `min_keys` (EVIDENCE_MIN_KEYS, 5) keys decides
  nothing: gate (b) is not evaluated and gate (a) must then be beaten, as after a plain
  retrain. One key (or k colluding keys) moves the holdout accuracy by at most 0.2 (k * 0.2).
- Each training example weighs `feedback_weight` base samples (10), but one key fingerprint
  weighs at most `per_key_cap` examples in all (50): a key with n > cap examples gets
  cap / n per example. A flood from one key is worth 50 examples, not n.
- All feedback together weighs at most `max_feedback_share` (0.5) of the base training set.
- Fewer than `min_examples` (20) examples: a plain retrain on the base split; the feedback is
  neither trained on nor used as a gate, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist_api.deployment.evidence import holdout_weights, key_cap
from mnist_api.feedback.store import FeedbackRows, FeedbackStore

NPZ_FIELDS = ("images", "labels", "predicted", "versions", "key_fingerprints", "sha256", "times")


@dataclass(frozen=True)
class FeedbackRules:
    """How feedback enters training; see the module docstring."""

    holdout_fraction: float = 0.25
    min_examples: int = 20
    feedback_weight: float = 10.0
    per_key_cap: float = 50.0
    max_feedback_share: float = 0.5
    max_key_share: float = 0.2  # EVIDENCE_MAX_SHARE_PER_KEY: of the holdout's accuracy
    min_keys: int = 5  # EVIDENCE_MIN_KEYS: a holdout from fewer keys decides nothing


def read_database(url: str) -> FeedbackRows:
    """Every feedback row in the database at `url` (DATABASE_URL form), oldest first."""
    store = FeedbackStore.from_url(url, timeout=30.0)
    try:
        return store.rows()
    finally:
        store.dispose()


def export_npz(rows: FeedbackRows, path: Path) -> None:
    """Write the rows as a plain .npz (no pickle: fixed-width text arrays, float16 images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        images=rows.images.astype(np.float16),
        labels=rows.labels,
        predicted=rows.predicted,
        versions=rows.versions.astype(str),
        key_fingerprints=rows.key_fingerprints.astype(str),
        sha256=rows.sha256.astype(str),
        times=rows.times,
        routed=rows.routed,
    )


def read_npz(path: Path) -> FeedbackRows:
    """Rows exported by `export_npz` (loaded with pickle refused)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [name for name in NPZ_FIELDS if name not in data]
        if missing:
            raise ValueError(f"{path} is not a feedback export: no {', '.join(missing)}")
        return FeedbackRows(
            images=data["images"].astype(np.float32).reshape(-1, 28, 28),
            labels=data["labels"].astype(np.int64),
            predicted=data["predicted"].astype(np.int64),
            versions=data["versions"].astype(str),
            key_fingerprints=data["key_fingerprints"].astype(str),
            sha256=data["sha256"].astype(str),
            times=data["times"].astype(np.float64),
            # An export from before the field: nothing known to be routed, nothing gates.
            routed=(
                data["routed"].astype(bool)
                if "routed" in data
                else np.zeros(len(data["labels"]), bool)
            ),
        )


@dataclass(frozen=True)
class FeedbackSplit:
    """Feedback ready for training: weighted training examples and the held-out newest."""

    train_images: np.ndarray
    train_labels: np.ndarray
    train_weights: np.ndarray
    holdout_images: np.ndarray
    holdout_labels: np.ndarray
    examples: int  # after one-per-(key, image)
    rows: int  # as stored
    keys: int
    plain: bool  # too little feedback: a plain retrain
    # Per held-out example: its weight in the holdout accuracy (capped per key).
    holdout_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    holdout_keys: int = 0
    holdout_fingerprints: np.ndarray = field(default_factory=lambda: np.zeros(0, str))
    holdout_evidence: bool = False  # enough keys, each capped: gate (b) may decide

    def describe(self, rules: FeedbackRules) -> str:
        """One sentence for the log and the report."""
        if self.plain:
            return (
                f"plain retrain: only {self.examples} feedback examples ({self.rows} rows), fewer "
                f"than {rules.min_examples}; the feedback is not used"
            )
        held = (
            f"the newest {len(self.holdout_labels)} held out for gate (b) "
            f"({self.holdout_keys} keys, each at most {rules.max_key_share:.0%} of it)"
            if self.holdout_evidence
            else f"the newest {len(self.holdout_labels)} held out, from {self.holdout_keys} "
            f"keys: too few to decide (at least {rules.min_keys}, each at most "
            f"{rules.max_key_share:.0%}), so gate (b) is not evaluated"
        )
        return (
            f"{self.rows} feedback rows from {self.keys} keys -> {self.examples} examples: "
            f"{len(self.train_labels)} trained on (total weight "
            f"{self.train_weights.sum():.0f} base samples), {held}"
        )


def one_per_key_and_image(rows: FeedbackRows) -> np.ndarray:
    """Indices of the newest row of each (key fingerprint, image), in time order."""
    newest: dict[tuple[str, str], int] = {}
    for index in np.argsort(rows.times, kind="stable"):
        newest[(str(rows.key_fingerprints[index]), str(rows.sha256[index]))] = int(index)
    return np.array(sorted(newest.values(), key=lambda i: (rows.times[i], i)), dtype=np.int64)


def key_weights(fingerprints: np.ndarray, rules: FeedbackRules) -> np.ndarray:
    """Per example: `feedback_weight`, scaled down for keys with more than `per_key_cap`."""
    keys, inverse, counts = np.unique(fingerprints, return_inverse=True, return_counts=True)
    per_example = np.minimum(1.0, rules.per_key_cap / counts)
    return rules.feedback_weight * per_example[inverse] if len(keys) else np.zeros(0)


def split_feedback(rows: FeedbackRows, base_samples: int, rules: FeedbackRules) -> FeedbackSplit:
    """Deduplicate, hold out the newest, and weigh the rest (see the module docstring)."""
    chosen = one_per_key_and_image(rows)
    keys = len(np.unique(rows.key_fingerprints)) if len(rows) else 0
    if len(chosen) < rules.min_examples:
        empty = np.zeros((0, 28, 28), np.float32)
        none = np.zeros(0, np.int64)
        return FeedbackSplit(
            empty, none, np.zeros(0), empty, none, len(chosen), len(rows), keys, plain=True
        )
    held, trained = newest_per_key(rows, chosen, rules.holdout_fraction)
    # Never train on an image that is in the holdout (another key may have judged it too).
    held_images = set(rows.sha256[held].tolist())
    trained = np.array([i for i in trained if rows.sha256[i] not in held_images], dtype=np.int64)
    weights = key_weights(rows.key_fingerprints[trained], rules)
    limit = rules.max_feedback_share * base_samples
    if weights.sum() > limit:
        weights = weights * (limit / weights.sum())
    held_keys = [str(key) for key in rows.key_fingerprints[held]]
    per_key = holdout_weights(held_keys, rules.max_key_share)
    distinct = len(per_key)
    counts = {key: held_keys.count(key) for key in per_key}
    evidence = distinct >= rules.min_keys and key_cap(counts.values(), rules.max_key_share) > 0
    return FeedbackSplit(
        train_images=rows.images[trained],
        train_labels=rows.labels[trained],
        train_weights=weights,
        holdout_images=rows.images[held],
        holdout_labels=rows.labels[held],
        examples=len(chosen),
        rows=len(rows),
        keys=keys,
        plain=False,
        holdout_weights=np.array([per_key[key] for key in held_keys], dtype=np.float64),
        holdout_keys=distinct,
        holdout_fingerprints=rows.key_fingerprints[held],
        holdout_evidence=evidence,
    )


def newest_per_key(
    rows: FeedbackRows, chosen: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """(held, trained): the newest `fraction` of each key's examples of routed answers
    (rounded half up; at least one example overall), and the rest, both in time order.

    Per key, not overall: a key that sent the newest thousand labels would otherwise be the
    whole holdout, and the gate would be decided by it alone. Routed only: a judgement of an
    answer the client pinned (`?model_version=`) trains like any other, but the version that
    answered it was the client's choice, so it is no evidence about the deployment."""
    by_key: dict[str, list[int]] = {}
    for index in chosen:  # `chosen` is in time order
        if not rows.routed[index]:
            continue
        by_key.setdefault(str(rows.key_fingerprints[index]), []).append(int(index))
    held_set: set[int] = set()
    for indices in by_key.values():
        count = int(len(indices) * fraction + 0.5)
        held_set.update(indices[len(indices) - count :] if count else [])
    if not held_set:  # the newest routed example, if any
        held_set.update(int(i) for i in chosen[::-1][rows.routed[chosen[::-1]]][:1])
    held = np.array([i for i in chosen if int(i) in held_set], dtype=np.int64)
    trained = np.array([i for i in chosen if int(i) not in held_set], dtype=np.int64)
    return held, trained
