"""API-key authentication: header `x-api-key`, keys from settings, constant-time comparison."""

from __future__ import annotations

import hashlib
import hmac

from apiflask import APIKeyHeaderAuth
from flask import current_app, g

from mnist_api.errors import Unauthorized

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
