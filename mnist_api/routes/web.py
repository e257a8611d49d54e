"""The browser page at `/`, its service worker at `/sw.js`, and the local Swagger UI assets
behind `/docs`."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from flask import Blueprint, Response, current_app, render_template, request, send_from_directory

bp = Blueprint("web", __name__)

# Swagger UI ships inside a PyPI package, so /docs needs no CDN.
SWAGGER_UI_DIR = Path(swagger_ui_bundle.swagger_ui_path)
SWAGGER_ASSETS = "/docs/assets"


@bp.get("/")
def index() -> Response:
    """The page: upload or draw a digit, see the prediction (on the device or the server)."""
    response = Response(render_template("index.html"), mimetype="text/html")
    # An ETag, so the service worker's revalidation of an unchanged page costs a 304.
    response.add_etag()
    response.headers["Cache-Control"] = "no-cache"
    response.make_conditional(request)
    return response


@bp.get("/sw.js")
def service_worker() -> Response:
    """The page's service worker, from the site root so that its scope is the whole page."""
    response = send_from_directory(current_app.static_folder or "static", "sw.js", max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # a new release is picked up at once
    response.mimetype = "text/javascript"
    return response


@bp.get(f"{SWAGGER_ASSETS}/<path:filename>")
def swagger_asset(filename: str) -> Response:
    """A Swagger UI file (CSS, JS) served from the installed package."""
    return send_from_directory(SWAGGER_UI_DIR, filename, max_age=86400)
