"""CORS for browser clients: which origins may call the API, with which headers.

Only requests that carry an `Origin` header (browsers) get CORS headers; curl and other
services pay nothing. A preflight (`OPTIONS` with `Access-Control-Request-Method`) is
answered by Flask's automatic OPTIONS response plus the allowed methods and headers.
(flask-cors, used before, spent about a tenth of a plain request computing these headers
for every request, origin or not.)
"""

from __future__ import annotations

from collections.abc import Sequence

from flask import Flask, Response, request

ALLOWED_HEADERS = ("x-api-key", "Content-Type", "X-Request-ID", "Inference-Header-Content-Length")
EXPOSED_HEADERS = (
    "X-Request-ID",
    "X-Cache",
    "X-Model-Version",
    "Retry-After",
    "Location",
    "Inference-Header-Content-Length",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)
MAX_AGE_SECONDS = 600  # browsers may reuse a preflight's answer this long


def init_app(app: Flask, origins: Sequence[str]) -> None:
    """Allow `origins` (`*` for any) to call every route from a browser."""
    any_origin = "*" in origins
    allowed = frozenset(origins)
    exposed = ", ".join(EXPOSED_HEADERS)
    allowed_headers = ", ".join(ALLOWED_HEADERS)

    @app.after_request
    def _cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if not origin:
            return response
        if any_origin:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.vary.add("Origin")  # a cache must not give this answer to other origins
        else:
            return response  # no CORS headers: the browser keeps the answer from the page
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response.headers["Access-Control-Allow-Methods"] = response.headers.get(
                "Allow", "GET, POST, PUT, OPTIONS"
            )
            response.headers["Access-Control-Allow-Headers"] = allowed_headers
            response.headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
        else:
            response.headers["Access-Control-Expose-Headers"] = exposed
        return response
