"""The browser page at `/` and the local Swagger UI assets behind `/docs`."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from flask import Blueprint, Response, render_template, send_from_directory

bp = Blueprint("web", __name__)

# Swagger UI ships inside a PyPI package, so /docs needs no CDN.
SWAGGER_UI_DIR = Path(swagger_ui_bundle.swagger_ui_path)
SWAGGER_ASSETS = "/docs/assets"


@bp.get("/")
def index() -> str:
    """The page: upload or draw a digit, see the prediction."""
    return render_template("index.html")


@bp.get(f"{SWAGGER_ASSETS}/<path:filename>")
def swagger_asset(filename: str) -> Response:
    """A Swagger UI file (CSS, JS) served from the installed package."""
    return send_from_directory(SWAGGER_UI_DIR, filename, max_age=86400)
