"""The service layer: upload bytes in, the contract's prediction object out.

Views call this; it owns the order of work (choose the version, hash, look up the cache,
decode and preprocess the misses, one model call for all of them, score them in the shadow
if the deployment says so, store the answers) so the HTTP layer holds no NumPy and the
Celery worker can reuse it as is.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from loguru import logger
from PIL import Image

from mnist_api import metrics
from mnist_api.config import MIB, Settings
from mnist_api.errors import NotReady, ServiceError
from mnist_api.imaging import decoding as decoding_module
from mnist_api.imaging import preprocessing as preprocessing_module
from mnist_api.imaging.budget import DecodeBudget
from mnist_api.imaging.digest import upload_sha256
from mnist_api.imaging.preprocessing import Limits, preprocess, warm_up_upload
from mnist_api.inference.cache import PredictionCache, RidesAlong, cache_key
from mnist_api.inference.model import BATCH_BUCKETS, NUM_CLASSES, DigitModel
from mnist_api.inference.prediction_ids import PredictionIds, input_digest
from mnist_api.inference.registry import ModelRegistry
from mnist_api.inference.routing import Evidence, Route, Router, SingleRouter

Prediction = dict[str, Any]

# The normalised input's digest rides along in the cached answer (never in a response), so a
# cached answer gets a prediction id for the input it answered without decoding it again.
INPUT_FIELD = "input_digest"

# Six decimals keep the ten probabilities summing to 1 within 1e-5.
DECIMALS = 6


def limits_from(settings: Settings) -> Limits:
    """The decoding limits of `settings`: the pixel cap and this process's memory budget."""
    budget = DecodeBudget(settings.decode_memory_budget_mb * MIB, settings.decode_wait_seconds)
    return Limits(max_pixels=settings.max_image_pixels, budget=budget)


@cache
def _code_digest() -> bytes:
    """SHA-256 of the code that turns upload bytes into the model's input, and its libraries.

    `preprocessing.py` and `decoding.py` themselves, Pillow's and NumPy's versions: nobody
    has to remember to bump a number, any deploy that could change what the model sees
    changes it.
    """
    digest = hashlib.sha256()
    for module in (preprocessing_module, decoding_module):
        digest.update(Path(str(module.__file__)).read_bytes())
    digest.update(f"Pillow {PIL.__version__} NumPy {np.__version__}".encode())
    return digest.digest()


def preprocessing_version(limits: Limits | None = None) -> str:
    """8 hex digits that change whenever anything that decides an upload's answer changes.

    The decoding and preprocessing code (`_code_digest`) and the settings that change the
    decoded pixels or whether an upload is taken at all: the decode memory budget (it picks
    the scale a large image is decoded at) and the pixel cap.
    """
    limits = limits or Limits()
    settings = f"budget={limits.capacity} max_pixels={limits.max_pixels}".encode()
    return hashlib.sha256(_code_digest() + settings).hexdigest()[:8]


@dataclass
class PredictionService:
    """Turns uploads into predictions with the installed versions, a cache and limits."""

    registry: ModelRegistry
    limits: Limits
    cache: PredictionCache
    router: Router
    low_confidence_threshold: float = 0.6
    # Part of every cache key: a deploy that changes decoding, preprocessing or the decode
    # settings never serves old answers ("": computed from the code and `limits`).
    preprocessing: str = ""
    # Signs each answer's `prediction_id` (SECRET_KEY); None (tools only): answers carry none.
    ids: PredictionIds | None = None

    def __post_init__(self) -> None:
        if not self.preprocessing:
            self.preprocessing = preprocessing_version(self.limits)

    @classmethod
    def from_settings(cls, settings: Settings, cache: PredictionCache) -> PredictionService:
        """A loaded service outside the web app (bulk CLI, benchmark): every version, single."""
        registry = ModelRegistry.discover(settings.models_dir)
        registry.load()
        return cls(
            registry,
            limits_from(settings),
            cache,
            SingleRouter(registry.default_version(settings.default_model_version)),
            settings.low_confidence_threshold,
            ids=PredictionIds(settings.secret_key, settings.feedback_max_age_seconds)
            if settings.secret_key
            else None,
        )

    @property
    def model(self) -> DigitModel:
        """The stable version's model."""
        return self.registry.get(self.router.stable)

    @property
    def model_version(self) -> str:
        """The stable version's `model_version` string."""
        return self.model.full_version

    def warm_up(self) -> None:
        """Run one upload through decoding and every version, uncounted and uncached.

        Also loads every Pillow plugin now: the check that names a refused file's kind
        (PDF, TIFF, ...) would otherwise import them all during some client's request.
        """
        Image.init()
        image = preprocess(warm_up_upload(), self.limits)[np.newaxis]
        for model in self.registry:
            model.predict(image)

    def route_for(self, client: str = "", version: str | None = None) -> Route:
        """The deployment's route for this client, or the pinned `version` alone.

        `ModelNotFound` (404) when `version` is not installed.
        """
        if version:
            version = self.registry.get(version).version
            return Route(version, routed=False, deployment=self.router.deployment_id)
        return self.router.route(client)

    def lookup(self, data: bytes, route: Route, client: str = "") -> Prediction | None:
        """The cached answer of `route`'s version for an upload (with its prediction id for
        `client`, counted like any answer), or None."""
        self._require_ready()
        model = self.registry.get(route.answer)
        hit = self.cache.get_many([self.key_for(data, model)])[0]
        if hit is None or INPUT_FIELD not in hit:
            return None
        return self._deliver(model, route, client, [{**hit, "cached": True}])[0]

    def validate(self, data: bytes) -> None:
        """Raise the error /predict would give for this upload, without running the model."""
        preprocess(data, self.limits)

    def score_for_feedback(
        self, data: bytes, *, client: str = "", version: str | None = None
    ) -> tuple[DigitModel, np.ndarray, np.ndarray]:
        """What a version answered for an upload someone is judging: (model, input, probabilities).

        The version is `version` when given, else the one the deployment would use for
        `client`. The upload goes through exactly /predict's preprocessing (the same
        `ServiceError` for a bad image) and the returned (28, 28) input is what the model
        saw. Not counted as an answer and not cached: it is a re-scoring, not a prediction.
        """
        self._require_ready()
        model = self.registry.get(self.route_for(client, version).answer)
        image = preprocess(data, self.limits)
        return model, image, model.predict(image[np.newaxis])[0]

    def key_for(self, data: bytes, model: DigitModel | None = None) -> str:
        """The cache key of an upload: version, preprocessing and SHA-256 of the bytes."""
        model = model or self.model
        return cache_key(model.full_version, upload_sha256(data), self.preprocessing)

    def predict(
        self,
        data: bytes,
        *,
        client: str = "",
        version: str | None = None,
        along: RidesAlong | None = None,
    ) -> Prediction:
        """Predict one upload; raises a `ServiceError` subclass for a bad upload."""
        result = self.predict_many([data], client=client, version=version, along=along)[0]
        if isinstance(result, ServiceError):
            raise result
        return result

    def predict_many(
        self,
        uploads: list[bytes],
        *,
        client: str = "",
        version: str | None = None,
        route: Route | None = None,
        along: RidesAlong | None = None,
    ) -> list[Prediction | ServiceError]:
        """Predict a batch: one cache round trip, one interpreter call for all the misses.

        The whole batch goes to one version: `version` when pinned, else `route` when the
        caller already chose it (so a shadow still scores the batch), else the deployment's
        choice for `client`. A bad upload yields its error in its place; identical uploads
        are computed once. `along` (the request's rate-limit count) shares the cache's round
        trip and is settled right after it: over the limit, `RateLimited` is raised before
        anything is decoded.
        """
        self._require_ready()
        if route is None or version:
            route = self.route_for(client, version)
        model = self.registry.get(route.answer)
        keys = [self.key_for(data, model) for data in uploads]
        hits = self.cache.get_many(keys, along)
        if along is not None:
            along.settle()
        results: list[Prediction | ServiceError | None] = [
            # An answer cached without its input digest (older code) is computed again.
            {**hit, "cached": True} if hit is not None and INPUT_FIELD in hit else None
            for hit in hits
        ]
        pending: dict[str, list[int]] = {}  # key -> the slots waiting for its answer
        images: list[np.ndarray] = []
        for slot, (data, key) in enumerate(zip(uploads, keys, strict=True)):
            if results[slot] is not None:
                continue
            if key in pending:
                pending[key].append(slot)
                continue
            started = time.perf_counter()
            try:
                images.append(preprocess(data, self.limits))
            except ServiceError as error:
                results[slot] = error
                continue
            finally:
                metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
            pending[key] = [slot]
        if images:
            fresh: dict[str, Prediction] = {}
            probabilities = self._infer(model, route, client, np.stack(images))
            shaped = zip(pending.items(), probabilities, images, strict=True)
            for (key, slots), row, image in shaped:
                answer = self._shape(row, model)
                answer[INPUT_FIELD] = input_digest(image)
                fresh[key] = answer
                for slot in slots:
                    results[slot] = answer
            self.cache.set_many(fresh)
        answered = [result for result in results if result is not None]
        assert len(answered) == len(uploads), "every upload gets an answer or an error"
        answers = self._deliver(
            model, route, client, [item for item in answered if isinstance(item, dict)]
        )
        delivered = iter(answers)
        return [next(delivered) if isinstance(item, dict) else item for item in answered]

    def _infer(self, model: DigitModel, route: Route, client: str, batch: np.ndarray) -> np.ndarray:
        """One timed model call for `batch`, counted against `model` if it fails, and scored by
        the shadow version when the route has one."""
        started = time.perf_counter()
        try:
            probabilities = model.predict(batch)
        except Exception:
            self._count_failure(model, route, client, len(batch))
            raise
        metrics.INFERENCE_SECONDS.labels(model_version=model.full_version).observe(
            time.perf_counter() - started
        )
        if route.shadow is not None:
            self._score_in_shadow(model, route.shadow, batch, probabilities)
        return probabilities

    def _count_failure(self, model: DigitModel, route: Route, client: str, count: int) -> None:
        """The guard compares error rates per version: a failing candidate is rolled back
        (routed requests only: a pinned one is no evidence)."""
        if route.routed:
            self.router.observe(model.version, client, [], count)

    def _deliver(
        self, model: DigitModel, route: Route, client: str, answers: list[Prediction]
    ) -> list[Prediction]:
        """The answers as clients get them (each with its own `prediction_id`, the input
        digest removed), counted in the metrics and, when routed, as the guard's evidence."""
        metrics.record_answers(answers, self.low_confidence_threshold)
        now = time.time()
        delivered: list[Prediction] = []
        evidence: Evidence = []
        for answer in answers:
            shaped = {name: value for name, value in answer.items() if name != INPUT_FIELD}
            digest = str(answer[INPUT_FIELD])
            if self.ids is not None:
                shaped["prediction_id"] = self.ids.issue(
                    version=model.version,
                    deployment=route.deployment,
                    routed=route.routed,
                    client=client,
                    digest=digest,
                    now=now,
                )
            delivered.append(shaped)
            evidence.append((digest, shaped["probabilidad"] < self.low_confidence_threshold))
        if evidence and route.routed:
            self.router.observe(model.version, client, evidence)
        return delivered

    def predict_pixels(
        self, images: np.ndarray, *, client: str = "", version: str | None = None
    ) -> tuple[DigitModel, np.ndarray, list[str]]:
        """Probabilities (n, 10) for images already in MNIST form, the model that answered and
        one prediction id per image (none without a signer).

        `images` is (n, 28, 28) float32 in [0, 1], light ink on black (the Open Inference
        Protocol's `pixels` input). No decoding, no preprocessing and no cache: hashing the
        pixels would cost about what the model does. One interpreter call per chunk of the
        largest batch bucket (64), so a big tensor never makes an interpreter of its own
        size; the route (pinned `version`, else the deployment's choice for `client`) and
        its shadow scoring apply as for uploads, and the answers are counted the same way.
        """
        self._require_ready()
        route = self.route_for(client, version)
        model = self.registry.get(route.answer)
        chunk = BATCH_BUCKETS[-1]
        parts = []
        for start in range(0, len(images), chunk):
            parts.append(self._infer(model, route, client, images[start : start + chunk]))
        answered = np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES))
        digits = np.argmax(answered, axis=1)
        delivered = self._deliver(
            model,
            route,
            client,
            [
                {
                    "prediccion": int(digit),
                    "probabilidad": float(row[digit]),
                    "model_version": model.full_version,
                    INPUT_FIELD: input_digest(image),
                }
                for digit, row, image in zip(digits, answered, images, strict=True)
            ],
        )
        return model, answered, [str(item.get("prediction_id", "")) for item in delivered]

    def _score_in_shadow(
        self, stable: DigitModel, version: str, batch: np.ndarray, answered: np.ndarray
    ) -> None:
        """Run the shadow version on the inputs stable just scored; never fail the answer.

        The candidate reuses the preprocessed batch: one more interpreter call, no decode.
        """
        try:
            shadow = self.registry.get(version)
            started = time.perf_counter()
            probabilities = shadow.predict(batch)
            metrics.INFERENCE_SECONDS.labels(model_version=shadow.full_version).observe(
                time.perf_counter() - started
            )
            agree = np.argmax(probabilities, axis=1) == np.argmax(answered, axis=1)
            metrics.record_shadow(stable.full_version, shadow.full_version, agree.tolist())
        except Exception as error:  # the shadow is an experiment: it must never cost an answer
            logger.warning("shadow scoring failed: {}", type(error).__name__)

    def _require_ready(self) -> None:
        if not self.registry.ready:
            raise NotReady()

    def _shape(self, probabilities: np.ndarray, model: DigitModel) -> Prediction:
        digit = int(np.argmax(probabilities))
        rounded = [round(float(p), DECIMALS) for p in probabilities]
        return {
            "prediccion": digit,
            "probabilidad": rounded[digit],
            "probabilities": rounded,
            "model_version": model.full_version,
            "cached": False,
        }
