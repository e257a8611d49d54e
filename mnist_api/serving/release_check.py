"""Heroku release phase: refuse to release when a model version does not match its card.

`python -m mnist_api.serving.release_check` exits non-zero (and the release fails, leaving the
running dynos alone) if there is no installed version, or if any version folder's model or
card is missing, if the file's SHA-256 or size differ from its card, if the folder is not
named after the file's version, or if LiteRT cannot load it and run one inference. It also
checks that `DEFAULT_MODEL_VERSION`, when set, is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mnist_api.config import ConfigError, Settings
from mnist_api.inference.model import DigitModel
from mnist_api.inference.registry import CARD_FILE, TFLITE_FILE, ModelRegistry, is_version_dir


class ReleaseCheckFailed(RuntimeError):
    """A model is not fit to release; the message says why."""


def check_version(folder: Path) -> str:
    """Return the full version of one version folder if file, card and runtime agree."""
    model_path, card_path = folder / TFLITE_FILE, folder / CARD_FILE
    if not model_path.is_file():
        raise ReleaseCheckFailed(f"model file {model_path} is missing")
    if not card_path.is_file():
        raise ReleaseCheckFailed(f"model card {card_path} is missing")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseCheckFailed(f"model card {card_path} is not valid JSON: {exc}") from exc
    model = DigitModel(model_path, card_path)
    try:
        model.load()  # parses the file and runs a warm-up inference in LiteRT
    except Exception as exc:
        raise ReleaseCheckFailed(f"LiteRT cannot run {model_path}: {type(exc).__name__}") from exc
    if card.get("sha256") != model.sha256:
        raise ReleaseCheckFailed(
            f"{folder.name}: model file sha256 {model.sha256[:12]} does not match its card "
            f"({str(card.get('sha256'))[:12]}): rebuild both with `make model`"
        )
    if card.get("size_bytes") != model_path.stat().st_size:
        raise ReleaseCheckFailed(f"{folder.name}: model size does not match its card")
    if card.get("version") != model.version:
        raise ReleaseCheckFailed(
            f"{folder.name}: the card's version is not the first 12 hex of its sha256"
        )
    if folder.name != model.version:
        raise ReleaseCheckFailed(
            f"folder {folder.name} holds version {model.version}: name it after the version"
        )
    return model.full_version


def check_models(settings: Settings) -> list[str]:
    """Check every installed version; return their full versions, oldest first."""
    # Every visible folder under models/ must be a complete version: one that lost its model
    # file, or is not named after it, would otherwise just be skipped by the registry.
    if not settings.models_dir.is_dir():
        raise ReleaseCheckFailed(f"the models folder {settings.models_dir} is missing")
    for folder in sorted(p for p in settings.models_dir.iterdir() if p.is_dir()):
        if folder.name.startswith((".", "_")):
            continue
        if not is_version_dir(folder):
            raise ReleaseCheckFailed(
                f"models/{folder.name} is not an installed version: a version folder is named "
                f"after the first 12 hex of its {TFLITE_FILE}'s SHA-256 and holds that file"
            )
    try:
        registry = ModelRegistry.discover(settings.models_dir)
        registry.default_version(settings.default_model_version)
    except ConfigError as exc:
        raise ReleaseCheckFailed(str(exc)) from exc
    return [check_version(model.model_path.parent) for model in registry]


def main() -> int:
    """Command-line entry point for the Procfile's release line."""
    try:
        versions = check_models(Settings.from_env())
    except ReleaseCheckFailed as failure:
        sys.stderr.write(f"release check failed: {failure}\n")
        return 1
    sys.stdout.write(f"release check passed: {', '.join(versions)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
