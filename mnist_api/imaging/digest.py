"""The upload's SHA-256: the one name an upload has everywhere (job store, cache key, feedback)."""

from __future__ import annotations

import hashlib


def upload_sha256(data: bytes) -> str:
    """The hex SHA-256 of an upload's bytes, exactly as received."""
    return hashlib.sha256(data).hexdigest()
