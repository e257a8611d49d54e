"""Per-key rate limits on the keyed API (flask-limiter), shared by every worker and dyno.

Counts live in Redis when `REDIS_URL` is set (one count across workers and dynos), else in
memory. A request with a valid key is counted against that key; anything else (no key, a
wrong key) against the client's IP, so rotating made-up keys does not escape the limit.
That IP is the TCP peer unless `PROXY_FIX_X_FOR` trusts proxies (Heroku's router). If
the limiter's Redis fails, requests are still served (fail open, logged) and counted in
memory until Redis answers again. Public routes (/healthz, /readyz, /metrics, the page)
are not limited.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apiflask import APIBlueprint
from flask import Flask, request
from flask_limiter import Limiter
from werkzeug.middleware.proxy_fix import ProxyFix

from mnist_api import redis_clients
from mnist_api.auth import API_KEY_HEADER, key_fingerprint, key_matches
from mnist_api.config import Settings
from mnist_api.extensions import get_settings


def rate_limit_key() -> str:
    """The identity a request is counted against: its valid key, else its client IP."""
    key = request.headers.get(API_KEY_HEADER, "")
    if key and key_matches(key, get_settings().api_keys):
        return f"key:{key_fingerprint(key)}"
    return f"ip:{request.remote_addr or 'unknown'}"


def init_app(
    app: Flask, settings: Settings, limited: APIBlueprint | Sequence[APIBlueprint]
) -> Limiter | None:
    """Trust X-Forwarded-For if told to (PROXY_FIX_X_FOR), then limit the routes of `limited`
    (a blueprint or several), each route counted per key as /predict is."""
    if settings.proxy_fix_x_for > 0:
        # Heroku's router (one hop) appends the client's address: without this every
        # request would come from the router and share one IP bucket. Without a proxy in
        # front (docker run, compose) the header is the client's own word, so it is only
        # trusted when PROXY_FIX_X_FOR says how many proxies append to it.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.proxy_fix_x_for, x_proto=settings.proxy_fix_x_for
        )
    if not settings.rate_limit:
        return None
    storage_options: dict[str, Any] = {}
    if settings.redis_url:
        # limits' RedisStorage takes a ready pool: this process's shared `LIMITS` pool, so
        # the URL's TLS decision and the timeouts are made in one place.
        storage_options = {
            "connection_pool": redis_clients.pool(settings.redis_url, redis_clients.LIMITS)
        }
    limiter = Limiter(
        key_func=rate_limit_key,
        app=app,
        storage_uri=settings.redis_url or "memory://",
        storage_options=storage_options,
        strategy="fixed-window",
        headers_enabled=True,
        swallow_errors=True,  # a limiter outage must never become a 5xx
        in_memory_fallback_enabled=True,
        key_prefix="mnist-rl",
    )
    for blueprint in (limited,) if isinstance(limited, APIBlueprint) else limited:
        limiter.limit(settings.rate_limit)(blueprint)
    return limiter
