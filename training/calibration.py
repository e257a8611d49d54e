"""How far a model's confidence can be trusted: expected calibration error and the bins of
a reliability diagram (Guo et al., 2017, "On Calibration of Modern Neural Networks").

A model is calibrated when, of all the answers it gives with confidence about p, a share
of about p is right. The top probabilities are sorted into `ECE_BINS` equal-width bins of
[0, 1]; the ECE is the mean over bins of |accuracy - mean confidence|, weighted by the
share of answers in the bin (0: perfectly calibrated).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np

ECE_BINS = 15


@dataclass(frozen=True)
class Bin:
    """One confidence bin: its range, how many answers fell in it, and how they did."""

    lower: float
    upper: float
    count: int
    confidence: float  # mean top probability of the answers in the bin (NaN: empty)
    accuracy: float  # share of them that were right (NaN: empty)


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> list[Bin]:
    """The answers (n, 10 probabilities) sorted into `bins` equal-width confidence bins."""
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i + 1]]; a confidence of exactly 0 cannot occur (>= 0.1).
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    found = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        found.append(
            Bin(
                lower=float(edges[i]),
                upper=float(edges[i + 1]),
                count=count,
                confidence=float(confidence[members].mean()) if count else float("nan"),
                accuracy=float(right[members].mean()) if count else float("nan"),
            )
        )
    return found


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE over `bins` equal-width bins: sum of |accuracy - confidence| x share of answers."""
    total = len(labels)
    if not total:
        return float("nan")
    return float(
        sum(
            b.count / total * abs(b.accuracy - b.confidence)
            for b in reliability_bins(probabilities, labels, bins)
            if b.count
        )
    )


def draw_reliability(axis: plt.Axes, series: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """One reliability panel: per series, accuracy against mean confidence per bin (point
    area: the bin's share of answers), its ECE in the legend, the diagonal for reference."""
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for name, probabilities, labels in series:
        used = [b for b in reliability_bins(probabilities, labels) if b.count]
        ece = expected_calibration_error(probabilities, labels)
        (line,) = axis.plot(
            [b.confidence for b in used],
            [b.accuracy for b in used],
            linewidth=1,
            alpha=0.6,
            label=f"{name} (ECE {ece * 100:.2f}%)",
        )
        axis.scatter(
            [b.confidence for b in used],
            [b.accuracy for b in used],
            s=[6 + 300 * b.count / len(labels) for b in used],
            color=line.get_color(),
        )
    axis.set_xlabel(f"confidence ({ECE_BINS} bins; area: share of answers)")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.legend(loc="upper left", fontsize=7)


def reliability_diagram(
    panels: list[tuple[str, list[tuple[str, np.ndarray, np.ndarray]]]], path: Path
) -> None:
    """Draw one reliability diagram per evaluation set into a PNG.

    `panels`: (set title, [(series name, probabilities, labels), ...]); each series is a
    line of accuracy against mean confidence per bin, with its ECE in the legend. Points on
    the diagonal are calibrated; below it the model is over-confident. A point's area grows
    with the share of answers in its bin: the low-confidence bins of a good model hold a
    handful of answers, and their zig-zag says little.
    """
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for axis, (title, series) in zip(axes[0], panels, strict=True):
        draw_reliability(axis, series)
        axis.set_title(f"{title} ({len(series[0][2])})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
