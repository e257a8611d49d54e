"""The training report `quantize_model.py` installs next to a new version: a markdown page
(recipe, per-set accuracy and calibration against stable, the release gate) and a PNG of
reliability diagrams, one per evaluation set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.calibration import ECE_BINS, reliability_diagram

REPORT_MD = "training_report.md"
REPORT_PNG = "training_report.png"

# Evaluation sets as the card names them: (title, card key of the accuracy, of the ECE).
SETS = {
    "test": ("test split", "accuracy_int8", "test_ece"),
    "user_style": ("user-style uploads", "user_style_accuracy", "user_style_ece"),
    "printed": ("printed digits", "printed_accuracy", "printed_ece"),
    "other_writers": ("other writers (UCI)", "other_writers_accuracy", "other_writers_ece"),
}

# Per set: (series name, probabilities (n, 10), labels) for each version compared.
Series = dict[str, list[tuple[str, np.ndarray, np.ndarray]]]


def write(
    folder: Path,
    card: dict[str, Any],
    stable: tuple[str, dict[str, Any]] | None,
    series: Series,
) -> tuple[Path, Path]:
    """Write the report's two files into `folder` and return their paths."""
    markdown, png = folder / REPORT_MD, folder / REPORT_PNG
    reliability_diagram([(SETS[name][0], found) for name, found in series.items()], png)
    markdown.write_text(_markdown(card, stable))
    return markdown, png


def _markdown(card: dict[str, Any], stable: tuple[str, dict[str, Any]] | None) -> str:
    training = card.get("training", {})
    metrics = card["metrics"]
    lines = [
        f"# Training report: version {card['version']}",
        "",
        f"Recipe `{training.get('recipe', '?')}`: {training.get('recipe_description', '')}.",
        f"Trained in {training.get('training_seconds', '?')} s on "
        f"{training.get('train_samples', '?')} samples (seed {training.get('seed', '?')}); "
        f"validation accuracy of the first run {training.get('validation_accuracy')}.",
        "",
    ]
    distillation = training.get("distillation")
    if distillation:
        lines += [
            "Teachers (validation accuracy in the first run): "
            + ", ".join(
                f"{t['recipe']} seed {t['seed']} {t['validation_accuracy']}"
                for t in distillation["teachers"]
            )
            + f"; their ensemble {distillation['teachers_ensemble_validation_accuracy']}.",
            "",
        ]
    header = f"| int8, accuracy / ECE ({ECE_BINS} bins) | samples | {card['version']} (new) |"
    rule = "|---|---:|---:|"
    if stable is not None:
        header += f" {stable[0]} (stable) |"
        rule += "---:|"
    lines += [header, rule]
    for name, (title, accuracy_key, ece_key) in SETS.items():
        samples = metrics.get(f"{name}_samples", metrics.get("test_samples"))
        row = f"| {title} | {samples} | {_cell(metrics, accuracy_key, ece_key)} |"
        if stable is not None:
            row += f" {_cell(stable[1], accuracy_key, ece_key)} |"
        lines.append(row)
    gate = card.get("release_gate")
    lines.append("")
    if gate:
        verdict = "passed" if gate["passed"] else "failed"
        lines += [f"Release gate against stable {gate['stable']}: **{verdict}**.", ""]
        lines += [
            f"- {c['name']}: {c['rule']} ({c['detail']}): {'pass' if c['passed'] else 'FAIL'}"
            for c in gate["checks"]
        ]
    else:
        lines.append("No stable version to gate against (the first installed version).")
    lines += [
        "",
        f"![Reliability diagrams]({REPORT_PNG})",
        "",
        "Reliability: answers sorted by confidence into 15 equal bins; a calibrated model's "
        "points lie on the diagonal, points below it are over-confident.",
        "",
    ]
    return "\n".join(lines)


def _cell(metrics: dict[str, Any], accuracy_key: str, ece_key: str) -> str:
    accuracy, ece = metrics.get(accuracy_key), metrics.get(ece_key)
    if accuracy is None:
        return "n/a"
    return f"{accuracy * 100:.1f}% / {ece * 100:.2f}%" if ece is not None else f"{accuracy:.4f}"
