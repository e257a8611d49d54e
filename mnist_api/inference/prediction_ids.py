"""Prediction ids: a signed receipt for one answer, which feedback must bring back.

An id binds the version that answered, the deployment in force, whether the deployment
routed the request (or a client pinned the version), the hash of the normalised 28x28 input,
the key that asked, and the time. It is verified without a lookup: the text is an HMAC-SHA256
(with `SECRET_KEY`) over those fields, base64url. The key is bound but not carried: its
fingerprint is part of what is signed, so an id only verifies for the key it was issued to,
and nobody learns anything about that key from the id. No pickle, no JSON: a short text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

import numpy as np

from mnist_api.errors import InvalidPredictionId

FORMAT = "1"  # bumped if the fields change; an id of another format does not verify
INPUT_DTYPE = np.dtype("<f2")  # the feedback store's encoding of the 28x28 input
MAC_BYTES = 16  # 128 bits of HMAC-SHA256: far beyond guessing
MAX_ID_LENGTH = 200  # longer text is refused before any decoding


def input_digest(image: np.ndarray) -> str:
    """The hash of a normalised (28, 28) input: 32 hex digits of SHA-256 of its float16 form.

    float16 is how the feedback store keeps the input, so the hash of a stored row can be
    recomputed, and two uploads whose pixels agree to ~1e-3 (the same drawing in another
    container, with other metadata) get the same hash: evidence counts pixels, not bytes.
    """
    data = np.asarray(image, dtype=np.float32).reshape(28, 28).astype(INPUT_DTYPE).tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True)
class Answered:
    """What a valid prediction id says about the answer it was issued for."""

    version: str  # the short 12-hex version id that answered
    deployment: str  # the id of the deployment in force when it answered
    routed: bool  # True: the deployment chose the version; False: the client pinned it
    input_digest: str
    issued: int  # seconds since the epoch


class PredictionIds:
    """Issues and verifies prediction ids with one secret."""

    def __init__(self, secret: str, max_age_seconds: int = 7 * 86_400) -> None:
        # A derived key: the same SECRET_KEY may sign other things without any overlap.
        key = hashlib.sha256(b"mnist-prediction-id:" + secret.encode()).digest()
        # Keyed once; each id copies it (cheaper than keying HMAC per answer: hot path).
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self.max_age_seconds = max_age_seconds

    def issue(
        self,
        *,
        version: str,
        deployment: str,
        routed: bool,
        client: str,
        digest: str,
        now: float | None = None,
    ) -> str:
        """The id of an answer by `version` to `client` (a key fingerprint) for `digest`."""
        issued = int(time.time() if now is None else now)
        payload = f"{FORMAT}|{version}|{int(routed)}|{digest}|{issued:x}|{deployment}".encode()
        return _b64(payload) + "." + _b64(self._mac(payload, client))

    def verify(self, token: str, client: str, now: float | None = None) -> Answered:
        """The answer `token` names, if it was issued by this service to `client` and is not
        older than the maximum age; else `InvalidPredictionId` (400)."""
        if not token or len(token) > MAX_ID_LENGTH or token.count(".") != 1:
            raise InvalidPredictionId()
        text, _, mac = token.partition(".")
        try:
            payload, given = _unb64(text), _unb64(mac)
        except (ValueError, binascii.Error):
            raise InvalidPredictionId() from None
        # Forged, altered or issued to another key: the MAC differs (constant-time compare).
        if not hmac.compare_digest(given, self._mac(payload, client)):
            raise InvalidPredictionId()
        fields = payload.decode("ascii", "replace").split("|", 5)
        if len(fields) != 6 or fields[0] != FORMAT:
            raise InvalidPredictionId()
        _, version, routed, digest, issued_hex, deployment = fields
        issued = int(issued_hex, 16)
        age = (time.time() if now is None else now) - issued
        if age > self.max_age_seconds:
            raise InvalidPredictionId(
                "This prediction_id has expired: feedback is taken for answers up to "
                f"{self.max_age_seconds} seconds old. Predict the image again and judge that "
                "answer."
            )
        return Answered(version, deployment, routed == "1", digest, issued)

    def _mac(self, payload: bytes, client: str) -> bytes:
        mac = self._keyed.copy()
        mac.update(payload + b"|" + client.encode())
        return mac.digest()[:MAC_BYTES]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
