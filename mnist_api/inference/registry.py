"""The installed model versions: found under `models/<version>/`, all loaded at start.

Each version lives in its own folder named after its id, the first 12 hex digits of the
`.tflite` file's SHA-256, next to its model card (and, for training, the Keras file):

    models/fe5e4f4d480b/mnist_cnn_int8.tflite
    models/fe5e4f4d480b/model_card.json

The folder name is checked against the file when it loads, so a folder cannot claim to be
another version. Versions are small (~150 KB), so every one is loaded in every process and
switching between them at runtime costs nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_api.config import ConfigError
from mnist_api.errors import BrowserModelNotFound, ModelNotFound
from mnist_api.inference.model import MODEL_NAME, DigitModel

TFLITE_FILE = "mnist_cnn_int8.tflite"
CARD_FILE = "model_card.json"
# Next to the version folders: which version a fresh deployment starts with as stable, and
# the evidence it was chosen on (written by `python -m training.default_stable`).
DEFAULT_DEPLOYMENT_FILE = "default_deployment.json"
VERSION_LENGTH = 12


class RegistryError(ConfigError):
    """The models folder holds no usable version, or a folder disagrees with its file."""


@dataclass(frozen=True)
class BrowserModel:
    """A version's browser variant (float32 edges around its int8 graph), for the page."""

    path: Path
    sha256: str
    size_bytes: int

    def url(self, version: str) -> str:
        """Where the page fetches it (with its API key)."""
        return f"/models/{version}/browser-model"


def _browser_model(folder: Path, card: dict[str, Any]) -> BrowserModel | None:
    """The variant the card lists, if its file is there and hashes to the card's SHA-256.

    A file that does not match its card is not offered at all: the page would refuse it
    anyway, and the server must not vouch for bytes the card does not describe.
    """
    entry = card.get("browser")
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return None
    path = folder / Path(entry["file"]).name  # a card cannot point outside its folder
    try:
        content = path.read_bytes()
    except OSError:
        return None
    sha256 = hashlib.sha256(content).hexdigest()
    if sha256 != entry.get("sha256"):
        return None
    return BrowserModel(path, sha256, len(content))


def _chosen_default(models_dir: Path) -> str:
    """The stable version `default_deployment.json` names, or "" without a usable file.

    A file that cannot be read or parsed is a broken release: `RegistryError`, so the
    release check and the service refuse it instead of silently starting another version.
    """
    path = models_dir / DEFAULT_DEPLOYMENT_FILE
    if not path.is_file():
        return ""
    try:
        chosen = json.loads(path.read_text()).get("stable", "")
    except (OSError, ValueError, AttributeError) as error:
        raise RegistryError(f"{path} cannot be read: {type(error).__name__}") from error
    if not isinstance(chosen, str) or not chosen:
        raise RegistryError(f"{path} names no stable version")
    return chosen


def is_version_dir(path: Path) -> bool:
    """True for a folder that looks like an installed version (12 hex digits, a .tflite)."""
    name = path.name
    return (
        path.is_dir()
        and len(name) == VERSION_LENGTH
        and all(c in "0123456789abcdef" for c in name)
        and (path / TFLITE_FILE).is_file()
    )


def short_version(model_version: str) -> str:
    """`fe5e4f4d480b` from either `fe5e4f4d480b` or `mnist-cnn-int8-fe5e4f4d480b`."""
    prefix = f"{MODEL_NAME}-"
    return model_version[len(prefix) :] if model_version.startswith(prefix) else model_version


@dataclass
class ModelRegistry:
    """Every installed version, by its 12-hex id, oldest first (by card date, then id)."""

    models_dir: Path
    models: dict[str, DigitModel] = field(default_factory=dict)
    # Versions whose card says they were installed to be tried as a candidate (a retrained
    # challenger): never the stable version by default, only once promoted.
    proposed: set[str] = field(default_factory=set)
    # Each version's browser variant, found when the versions load (None: it has none).
    browser: dict[str, BrowserModel | None] = field(default_factory=dict)
    # The stable version `default_deployment.json` names ("" without the file).
    chosen_default: str = ""

    @classmethod
    def discover(cls, models_dir: Path) -> ModelRegistry:
        """Find the version folders, oldest first; `RegistryError` if there are none.

        Only the cards are read here (for their dates, and whether a version was installed
        as a proposed candidate); the models load in `load()`.
        """
        folders = (
            [p for p in models_dir.iterdir() if is_version_dir(p)] if models_dir.is_dir() else []
        )
        cards = {p.name: _read_card(p / CARD_FILE) for p in folders}
        folders.sort(key=lambda p: (str(cards[p.name].get("created", "")), p.name))
        if not folders:
            raise RegistryError(
                f"no model version under {models_dir}: expected folders named after the "
                f"version with {TFLITE_FILE} inside; run `make model`."
            )
        models = {p.name: DigitModel(p / TFLITE_FILE, p / CARD_FILE) for p in folders}
        proposed = {name for name, card in cards.items() if card.get("proposed")}
        return cls(models_dir, models, proposed, chosen_default=_chosen_default(models_dir))

    def load(self) -> None:
        """Load every version and check that each folder is named after its file's hash."""
        for name, model in self.models.items():
            model.load()
            if model.version != name:
                raise RegistryError(
                    f"folder {name} holds model {model.version}: the folder name must be the "
                    "first 12 hex digits of the .tflite's SHA-256"
                )
            self.browser[name] = _browser_model(model.model_path.parent, model.card)

    @property
    def ready(self) -> bool:
        """True once every version is loaded."""
        return bool(self.models) and all(model.ready for model in self.models.values())

    @property
    def newest(self) -> str:
        """The id of the most recently created version."""
        return next(reversed(self.models))

    def default_version(self, wanted: str = "") -> str:
        """The stable version at first start: `wanted` (DEFAULT_MODEL_VERSION), else the one
        `default_deployment.json` chose on evidence, else the newest version not installed
        as a proposed candidate (else the newest).

        `RegistryError` (a `ConfigError`: the service refuses to start) when `wanted`, or
        the file's choice, is not installed.
        """
        if not wanted and self.chosen_default:
            if self.chosen_default not in self:
                raise RegistryError(
                    f"{DEFAULT_DEPLOYMENT_FILE} names {self.chosen_default!r}, which is not "
                    f"installed under {self.models_dir}; installed: {', '.join(self.versions())}"
                )
            return self.chosen_default
        if not wanted:
            settled = [version for version in self.models if version not in self.proposed]
            return settled[-1] if settled else self.newest
        if wanted not in self:
            raise RegistryError(
                f"DEFAULT_MODEL_VERSION {wanted!r} is not installed under {self.models_dir}; "
                f"installed: {', '.join(self.versions())}"
            )
        return short_version(wanted)

    def versions(self) -> list[str]:
        """The installed ids, oldest first."""
        return list(self.models)

    def __contains__(self, version: object) -> bool:
        return isinstance(version, str) and short_version(version) in self.models

    def __iter__(self) -> Iterator[DigitModel]:
        return iter(self.models.values())

    def get(self, version: str) -> DigitModel:
        """The model of `version` (short or full form); `ModelNotFound` if not installed."""
        model = self.models.get(short_version(version))
        if model is None:
            raise ModelNotFound()
        return model

    def browser_model(self, version: str) -> BrowserModel:
        """The browser variant of `version`; `ModelNotFound` or `BrowserModelNotFound`."""
        model = self.get(version)
        found = self.browser.get(model.version)
        if found is None:
            raise BrowserModelNotFound()
        return found

    def describe(self, roles: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """What `GET /models` lists: one entry per version with its role, oldest first."""
        roles = roles or {}
        return [
            {
                "model_version": model.full_version,
                "version": model.version,
                "created": model.card.get("created", ""),
                "metrics": model.card.get("metrics", {}),
                "role": roles.get(model.version),
                "browser_model": self._describe_browser(model.version),
            }
            for model in self.models.values()
        ]

    def _describe_browser(self, version: str) -> dict[str, Any] | None:
        """Where the page gets the version's browser variant, and the SHA-256 to check."""
        found = self.browser.get(version)
        if found is None:
            return None
        return {"url": found.url(version), "sha256": found.sha256, "size_bytes": found.size_bytes}


def _read_card(card_path: Path) -> dict[str, Any]:
    """A version's card, or {} when it is missing or unreadable (the model load says why)."""
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}
