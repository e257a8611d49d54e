"""The retraining report: a markdown page and a PNG (both confusion matrices, accuracy on
each set), written whether the challenger is accepted or refused."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np

from training.calibration import ECE_BINS, draw_reliability, expected_calibration_error

REPORT_MD = "retrain_report.md"
REPORT_PNG = "retrain_report.png"


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """10x10 counts: [label][predicted]."""
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


@dataclass(frozen=True)
class Scores:
    """One model's answers on one evaluation set."""

    labels: np.ndarray
    predicted: np.ndarray
    # Per sample (the feedback holdout: capped per key); None: every sample weighs 1.
    weights: np.ndarray | None = None
    # The model's probabilities (n, 10), for calibration; None: only the digits are known.
    probabilities: np.ndarray | None = None

    @classmethod
    def of(
        cls, labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None
    ) -> Scores:
        """Scores from a model's probabilities (its digit: the most probable one)."""
        return cls(labels, np.argmax(probabilities, axis=1), weights, probabilities)

    @property
    def ece(self) -> float:
        """Expected calibration error (15 bins, unweighted); NaN without probabilities."""
        if self.probabilities is None or not self.count:
            return math.nan
        return expected_calibration_error(self.probabilities, self.labels)

    @property
    def count(self) -> int:
        """Number of samples."""
        return len(self.labels)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy, weighted when the samples have weights (NaN on an empty set)."""
        if not self.count:
            return math.nan
        right = (self.labels == self.predicted).astype(np.float64)
        if self.weights is None or not self.weights.sum():
            return float(np.mean(right))
        return float(np.average(right, weights=self.weights))


@dataclass
class Gate:
    """One rule the challenger must pass, and how it went."""

    name: str
    rule: str
    passed: bool
    detail: str


@dataclass
class Report:
    """Everything the report shows."""

    stable: str
    challenger: str | None
    feedback: str
    training: str
    test_stable: Scores
    test_challenger: Scores | None
    holdout_stable: Scores | None
    holdout_challenger: Scores | None
    gates: list[Gate] = field(default_factory=list)
    decision: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        """True when every gate passed."""
        return bool(self.gates) and all(gate.passed for gate in self.gates)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value * 100:.2f}%"


def write_markdown(report: Report, path: Path) -> None:
    """The human-readable report."""
    test_c = report.test_challenger
    hold_s, hold_c = report.holdout_stable, report.holdout_challenger
    lines = [
        "# Retraining report",
        "",
        f"**Decision: {report.decision}**",
        "",
        f"- Stable: `{report.stable}`",
        f"- Challenger: `{report.challenger or 'none'}`",
        f"- Feedback: {report.feedback}",
        f"- Training: {report.training}",
        "",
        "| set | samples | stable | challenger |",
        "| --- | ---: | ---: | ---: |",
        f"| (a) fixed test split | {report.test_stable.count} | "
        f"{_percent(report.test_stable.accuracy)} | "
        f"{_percent(test_c.accuracy if test_c else None)} |",
        f"| (a) expected calibration error, {ECE_BINS} bins | {report.test_stable.count} | "
        f"{_percent(report.test_stable.ece)} | {_percent(test_c.ece if test_c else None)} |",
        f"| (b) newest feedback, held out | {hold_s.count if hold_s else 0} | "
        f"{_percent(hold_s.accuracy if hold_s else None)} | "
        f"{_percent(hold_c.accuracy if hold_c else None)} |",
        "",
        "## Gates",
        "",
        "| gate | rule | result | detail |",
        "| --- | --- | --- | --- |",
        *(
            f"| {g.name} | {g.rule} | {'pass' if g.passed else 'FAIL'} | {g.detail} |"
            for g in report.gates
        ),
        "",
        *(f"- {note}" for note in report.notes),
        "",
        f"![confusion matrices, accuracy and reliability]({REPORT_PNG})",
        "",
    ]
    path.write_text("\n".join(lines))


def write_png(report: Report, path: Path) -> None:
    """Stable's and the challenger's confusion matrices on (a), the accuracy bars, and the
    reliability diagram on (a)."""
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    panels = [("stable", report.test_stable), ("challenger", report.test_challenger)]
    for axis, (name, scores) in zip(axes[:2], panels, strict=True):
        axis.set_title(f"{name} on (a) test split")
        axis.set_xlabel("predicted")
        axis.set_ylabel("label")
        axis.set_xticks(range(10))
        axis.set_yticks(range(10))
        if scores is None:
            axis.text(0.5, 0.5, "no challenger", ha="center", va="center", transform=axis.transAxes)
            continue
        matrix = confusion(scores.labels, scores.predicted)
        axis.imshow(np.log1p(matrix), cmap="Blues")
        for (row, col), value in np.ndenumerate(matrix):
            if value:
                axis.text(col, row, str(value), ha="center", va="center", fontsize=7)
    bars = axes[2]
    sets = ["(a) test", "(b) feedback holdout"]
    stable = [report.test_stable.accuracy, _accuracy(report.holdout_stable)]
    challenger = [_accuracy(report.test_challenger), _accuracy(report.holdout_challenger)]
    x = np.arange(len(sets))
    bars.bar(x - 0.2, np.nan_to_num(stable), 0.4, label=f"stable {report.stable}")
    bars.bar(x + 0.2, np.nan_to_num(challenger), 0.4, label=f"challenger {report.challenger}")
    for offset, values in ((-0.2, stable), (0.2, challenger)):
        for position, value in zip(x + offset, values, strict=True):
            height = 0.0 if math.isnan(value) else value
            bars.text(position, height + 0.01, _percent(value), ha="center", fontsize=8)
    bars.set_xticks(x, sets)
    bars.set_ylim(0, 1.1)
    bars.set_title("accuracy")
    bars.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=1, fontsize=8)
    _reliability(axes[3], [("stable", report.test_stable), ("challenger", report.test_challenger)])
    figure.suptitle(report.decision)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _reliability(axis: plt.Axes, series: list[tuple[str, Scores | None]]) -> None:
    """Accuracy against confidence per bin on (a): on the diagonal is calibrated."""
    draw_reliability(
        axis,
        [
            (name, scores.probabilities, scores.labels)
            for name, scores in series
            if scores is not None and scores.probabilities is not None
        ],
    )
    axis.set_title("reliability on (a) test split")


def _accuracy(scores: Scores | None) -> float:
    return scores.accuracy if scores is not None else math.nan


def write(report: Report, folder: Path) -> tuple[Path, Path]:
    """Write both files into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown, png = folder / REPORT_MD, folder / REPORT_PNG
    write_markdown(report, markdown)
    write_png(report, png)
    return markdown, png
