"""Every credential the service checks, in one place: API keys (header `x-api-key`, an
APIFlask auth object), admin keys (an API key that is also in `ADMIN_API_KEYS`) and the
metrics token (`Authorization: Bearer <METRICS_TOKEN>` on /metrics). Keys come from the
settings and every comparison is constant-time."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from apiflask import APIKeyHeaderAuth
from flask import current_app, g, request

from mnist_api.errors import Forbidden, Unauthorized

View = TypeVar("View", bound=Callable[..., Any])

API_KEY_HEADER = "x-api-key"

api_key_auth = APIKeyHeaderAuth(
    name="ApiKeyAuth",
    param_name=API_KEY_HEADER,
    description="Send one of the service's API keys in the `x-api-key` header.",
)


def key_fingerprint(key: str) -> str:
    """A short, non-reversible tag for a key, safe to log (never log the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def admin_identity(key: str, names: tuple[tuple[str, str], ...], secret_key: str) -> str:
    """Who an admin key is, for the deployment history (which any API key can read).

    The name it was given (`ADMIN_API_KEYS=name:key`), else `key-` and 16 hex digits of
    HMAC-SHA256(SECRET_KEY, key): without the server's secret nobody can test a guess of
    the admin key against it offline, as they could against a plain hash of the key.
    """
    given = key.encode()
    for admin_key, name in names:
        if hmac.compare_digest(given, admin_key.encode()):
            return name
    digest = hmac.new(secret_key.encode(), given, hashlib.sha256).hexdigest()
    return f"key-{digest[:16]}"


def key_matches(candidate: str, keys: tuple[str, ...]) -> bool:
    """True if `candidate` equals one of `keys`; every key is compared in constant time."""
    given = candidate.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


def valid_key_fingerprint(token: str) -> str | None:
    """The fingerprint of `token` if it is one of the service's keys, else None.

    Checked once per request: the rate limiter (which counts per key) and the route's
    authentication both ask, and each check hashes the key and compares it with every key.
    """
    checked: tuple[str, str | None] | None = g.get("_checked_key")
    if checked is not None and checked[0] == token:
        return checked[1]
    keys: tuple[str, ...] = current_app.extensions["mnist_settings"].api_keys
    fingerprint = key_fingerprint(token) if token and key_matches(token, keys) else None
    g._checked_key = (token, fingerprint)
    return fingerprint


@api_key_auth.verify_token
def _verify(token: str) -> str | None:
    fingerprint = valid_key_fingerprint(token)
    if fingerprint is not None:
        g.api_key_fingerprint = fingerprint
    return fingerprint


@api_key_auth.error_handler
def _unauthorized(status: int) -> None:
    raise Unauthorized()


def admin_caller() -> str:
    """Who the admin calling is (its name, or a keyed fingerprint: `admin_identity`);
    `Forbidden` (403) for a valid key that is not an admin's.

    Runs after `api_key_auth`, so a missing or wrong key has already been answered 401.
    """
    settings = current_app.extensions["mnist_settings"]
    key = request.headers.get(API_KEY_HEADER, "")
    if not settings.admin_api_keys:
        raise Forbidden("No admin key is configured: set ADMIN_API_KEYS to change deployments.")
    if not key_matches(key, settings.admin_api_keys):
        raise Forbidden()
    name: str = admin_identity(key, settings.admin_names, settings.secret_key)
    return name


def metrics_token_required(token: str) -> Callable[[View], View]:
    """Protect a view (/metrics) with `Authorization: Bearer <token>`."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.encode(), token.encode()
            ):
                raise Unauthorized("Send the metrics token as 'Authorization: Bearer <token>'.")
            return view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
