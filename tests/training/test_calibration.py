"""Expected calibration error and reliability bins, on answers whose figures are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.calibration import (
    ECE_BINS,
    expected_calibration_error,
    reliability_bins,
    reliability_diagram,
)


def answers(confidence: float, right: int, wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """`right + wrong` answers for digit 0 at `confidence`; the first `right` are labelled 0."""
    count = right + wrong
    probabilities = np.full((count, 10), (1.0 - confidence) / 9.0)
    probabilities[:, 0] = confidence
    labels = np.array([0] * right + [1] * wrong)
    return probabilities, labels


def test_answers_right_as_often_as_they_are_confident_have_no_error() -> None:
    probabilities, labels = answers(0.8, right=80, wrong=20)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0)


def test_over_confidence_is_the_gap_weighted_by_the_share_of_answers() -> None:
    sure, sure_labels = answers(0.99, right=50, wrong=50)  # 99% sure, 50% right: gap 0.49
    fair, fair_labels = answers(0.5, right=25, wrong=25)  # calibrated: gap 0
    probabilities = np.concatenate([sure, fair])
    labels = np.concatenate([sure_labels, fair_labels])
    # 100 of 150 answers with a gap of 0.49, 50 with none.
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.49 * 100 / 150)


def test_bins_are_fifteen_equal_slices_and_count_every_answer() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, 500)
    bins = reliability_bins(probabilities, labels)
    assert len(bins) == ECE_BINS == 15
    assert bins[0].lower == 0.0 and bins[-1].upper == 1.0
    assert sum(b.count for b in bins) == 500
    for b in bins:
        if b.count:
            assert b.lower <= b.confidence <= b.upper
    # A confidence of exactly 1.0 lands in the last bin, not past it.
    certain, certain_labels = answers(1.0, right=3, wrong=0)
    assert reliability_bins(certain, certain_labels)[-1].count == 3


def test_an_empty_set_has_no_error_figure() -> None:
    assert np.isnan(expected_calibration_error(np.zeros((0, 10)), np.zeros(0, dtype=int)))


def test_the_diagram_is_a_png_with_one_panel_per_set(tmp_path: Path) -> None:
    probabilities, labels = answers(0.9, right=9, wrong=1)
    path = tmp_path / "reliability.png"
    reliability_diagram(
        [("set a", [("new", probabilities, labels)]), ("set b", [("new", probabilities, labels)])],
        path,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
