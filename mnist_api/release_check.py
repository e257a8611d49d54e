"""Heroku release phase: refuse to release when the model file does not match its card.

`python -m mnist_api.release_check` exits non-zero (and the release fails, leaving the
running dynos alone) if the model or its card is missing, if the file's SHA-256 or size
differ from the card, or if LiteRT cannot load it and run one inference.
"""

from __future__ import annotations

import json
import sys

from mnist_api.config import Settings
from mnist_api.model import DigitModel


class ReleaseCheckFailed(RuntimeError):
    """The model is not fit to release; the message says why."""


def check_model(settings: Settings) -> str:
    """Return the model version if file, card and runtime agree; raise otherwise."""
    if not settings.model_path.is_file():
        raise ReleaseCheckFailed(f"model file {settings.model_path} is missing")
    if not settings.model_card_path.is_file():
        raise ReleaseCheckFailed(f"model card {settings.model_card_path} is missing")
    try:
        card = json.loads(settings.model_card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseCheckFailed(f"model card is not valid JSON: {exc}") from exc
    model = DigitModel(settings.model_path, settings.model_card_path)
    try:
        model.load()  # parses the file and runs a warm-up inference in LiteRT
    except Exception as exc:
        raise ReleaseCheckFailed(f"LiteRT cannot run the model: {type(exc).__name__}") from exc
    if card.get("sha256") != model.sha256:
        raise ReleaseCheckFailed(
            f"model file sha256 {model.sha256[:12]} does not match its card "
            f"({str(card.get('sha256'))[:12]}): rebuild both with `make model`"
        )
    size = settings.model_path.stat().st_size
    if card.get("size_bytes") != size:
        raise ReleaseCheckFailed(f"model size {size} does not match its card")
    if card.get("version") != model.version:
        raise ReleaseCheckFailed("the card's version is not the first 12 hex of its sha256")
    return model.full_version


def main() -> int:
    """Command-line entry point for the Procfile's release line."""
    try:
        version = check_model(Settings.from_env())
    except ReleaseCheckFailed as failure:
        sys.stderr.write(f"release check failed: {failure}\n")
        return 1
    sys.stdout.write(f"release check passed: {version}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
