"""Settings from the environment, and the factory refusing to start without a key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_api import create_app
from mnist_api.config import ConfigError, Settings


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.api_keys == ()
    assert settings.max_content_length == 10 * 1024 * 1024
    assert settings.max_image_pixels == 50_000_000
    assert settings.batch_max_files == 64
    assert settings.port == 8000
    assert settings.cors_origins == ("*",)


def test_keys_from_api_keys_or_api_key() -> None:
    assert Settings.from_env({"API_KEYS": " a, b ,,c "}).api_keys == ("a", "b", "c")
    assert Settings.from_env({"API_KEY": "solo"}).api_keys == ("solo",)
    assert Settings.from_env({"API_KEYS": "x", "API_KEY": "y"}).api_keys == ("x",)


def test_typed_values() -> None:
    env = {
        "MAX_CONTENT_LENGTH": "2048",
        "PORT": "5000",
        "CORS_ORIGINS": "https://a.example,https://b.example",
        "LOG_FORMAT": "TEXT",
        "MODELS_DIR": "/srv/models",
        "DEFAULT_MODEL_VERSION": "fe5e4f4d480b",
    }
    settings = Settings.from_env(env)
    assert settings.max_content_length == 2048
    assert settings.port == 5000
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.log_format == "text"
    assert settings.models_dir == Path("/srv/models")
    assert settings.default_model_version == "fe5e4f4d480b"


@pytest.mark.parametrize(("name", "value"), [("PORT", "eighty"), ("BATCH_MAX_FILES", "0")])
def test_malformed_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_factory_refuses_to_start_without_a_key() -> None:
    with pytest.raises(ConfigError, match="API_KEY"):
        create_app(Settings())


def test_factory_refuses_to_start_without_a_secret_key() -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        create_app(Settings(api_keys=("k",)))


def test_factory_refuses_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MODELS_DIR"):
        create_app(Settings(api_keys=("k",), models_dir=tmp_path))


def test_factory_refuses_an_uninstalled_default_version() -> None:
    with pytest.raises(ConfigError, match="DEFAULT_MODEL_VERSION"):
        create_app(Settings(api_keys=("k",), secret_key="s", default_model_version="0123456789ab"))


def test_factory_builds_an_app(settings: Settings) -> None:
    app = create_app(settings)
    assert app.extensions["mnist_settings"] is settings
    assert app.config["MAX_CONTENT_LENGTH"] == settings.max_content_length


def test_serving_limits() -> None:
    defaults = Settings.from_env({})
    assert (defaults.request_header_timeout, defaults.request_body_timeout) == (10.0, 60.0)
    assert (defaults.keepalive, defaults.max_requests) == (2, 5_000_000)
    settings = Settings.from_env(
        {
            "REQUEST_HEADER_TIMEOUT": "2.5",
            "REQUEST_BODY_TIMEOUT": "30",
            "GUNICORN_KEEPALIVE": "100",
            "GUNICORN_MAX_REQUESTS": "0",
        }
    )
    assert settings.request_header_timeout == 2.5 and settings.request_body_timeout == 30.0
    assert settings.keepalive == 100 and settings.max_requests == 0
    with pytest.raises(ConfigError, match="GUNICORN_KEEPALIVE"):
        Settings.from_env({"GUNICORN_KEEPALIVE": "0"})
    with pytest.raises(ConfigError, match="REQUEST_HEADER_TIMEOUT"):
        Settings(api_keys=("k",), request_header_timeout=0).validate()
