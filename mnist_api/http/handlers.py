"""One JSON error shape for every route: `{"error", "code"}`, never exception text."""

from __future__ import annotations

from apiflask import APIFlask, HTTPError
from flask import Response, g, jsonify
from loguru import logger

from mnist_api import errors

# Framework-raised HTTP errors (routing, body limits, bad multipart) mapped to contract codes.
_BY_STATUS: dict[int, type[errors.ServiceError]] = {
    401: errors.Unauthorized,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
    429: errors.RateLimited,
    503: errors.NotReady,
}


class BadRequest(errors.ServiceError):
    status = 400
    code = "bad_request"
    message = "The request could not be understood; check its headers and body."


def error_response(error: errors.ServiceError) -> tuple[Response, int, dict[str, str]]:
    """The JSON response for a typed error (also counted by metrics later)."""
    g.error_code = error.code
    return jsonify(error.to_dict()), error.status, error.headers


def init_app(app: APIFlask) -> None:
    """Register the handlers on the app."""

    @app.errorhandler(errors.ServiceError)
    def _service_error(error: errors.ServiceError) -> tuple[Response, int, dict[str, str]]:
        return error_response(error)

    @app.error_processor
    def _http_error(error: HTTPError) -> tuple[Response, int, dict[str, str]]:
        kind = _BY_STATUS.get(error.status_code)
        if kind is None:
            kind = BadRequest if 400 <= error.status_code < 500 else errors.ServiceError
        typed = kind(headers={k: str(v) for k, v in dict(error.headers or {}).items()})
        typed.status = error.status_code
        if error.status_code >= 500:
            logger.error("unexpected HTTP {} error", error.status_code)
        return error_response(typed)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int, dict[str, str]]:
        # Logged with its stack (no variable values) and the request id; the client only
        # learns that it failed and which request id to quote.
        logger.opt(exception=exc).error("unhandled exception")
        return error_response(errors.ServiceError())
