"""The Open Inference Protocol's service: which model a path names, its metadata and
readiness, and one inference call from the request's bytes to the response's bytes.

Both input kinds (`image`, `pixels`) end in ONE answer type, `Answers`, with the same
precision: probabilities rounded to `DECIMALS` (6) decimals like every answer of the service
(/predict included), digits from the unrounded probabilities (so rounding never changes an
answer). The codec turns `Answers` into JSON or binary tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_api.config import Settings
from mnist_api.errors import ModelNotFound, NotReady, ServiceError, UnsupportedMediaType
from mnist_api.inference.registry import short_version
from mnist_api.inference.service import DECIMALS, PredictionService
from mnist_api.protocol import codec

PLATFORM = "tflite"


@dataclass(frozen=True)
class Answers:
    """A V2 inference's answers, whatever the input kind."""

    # The version that answered, its 12-hex id and its `model_version` string.
    version: str
    full_version: str
    # (n, 10) float64, rounded to DECIMALS; (n,) int64; one prediction id per input.
    probabilities: np.ndarray
    digits: np.ndarray
    prediction_ids: list[str]


@dataclass
class ProtocolService:
    """The V2 routes' one collaborator: it checks names, answers metadata and infers."""

    predictions: PredictionService
    settings: Settings

    def check_model(self, model_name: str, version: str | None) -> None:
        """404 unless `model_name` is this server's model and `version` (when given) is
        installed."""
        if model_name != codec.MODEL_NAME:
            raise ModelNotFound(
                f"No model named {model_name!r}: this server has one model, {codec.MODEL_NAME!r}."
            )
        if version is not None and version not in self.predictions.registry:
            raise ModelNotFound(
                f"Model {codec.MODEL_NAME!r} has no version {version!r}; "
                f"GET /v2/models/{codec.MODEL_NAME} lists the installed versions."
            )

    def ready(self, model_name: str, version: str | None) -> dict[str, Any]:
        """The model (or one version of it) is loaded and warmed up; NotReady (503) before."""
        self.check_model(model_name, version)
        registry = self.predictions.registry
        ready = registry.get(version).ready if version is not None else registry.ready
        if not ready:
            raise NotReady()
        return {"name": codec.MODEL_NAME, "ready": True}

    def metadata(self, model_name: str, version: str | None) -> dict[str, Any]:
        """The model's installed versions and its input and output tensors."""
        self.check_model(model_name, version)
        settings = self.settings
        return {
            "name": codec.MODEL_NAME,
            "versions": self.predictions.registry.versions(),
            "platform": PLATFORM,
            "inputs": [
                {
                    "name": codec.IMAGE_INPUT,
                    "datatype": "BYTES",
                    "shape": [-1],
                    "parameters": {
                        "description": "encoded image files (PNG, JPEG, GIF, WEBP, BMP), "
                        "preprocessed like /predict; base64 strings in JSON",
                        "max_batch": settings.batch_max_files,
                    },
                },
                {
                    "name": codec.PIXELS_INPUT,
                    "datatype": "UINT8",
                    "shape": [-1, codec.SIDE, codec.SIDE],
                    "parameters": {
                        "description": "images already in MNIST form: light ink on black, centred",
                        "datatypes": "UINT8 (0..255) or FP32 (0..1)",
                        "shapes": "[-1,28,28] or [-1,28,28,1]",
                        "max_batch": settings.v2_max_pixels_batch,
                    },
                },
            ],
            "outputs": [
                {
                    "name": codec.PROBABILITIES,
                    "datatype": "FP32",
                    "shape": [-1, codec.NUM_CLASSES],
                    "parameters": {"classification": "BYTES '<score>:<index>', best first"},
                },
                {"name": codec.DIGIT, "datatype": "INT64", "shape": [-1]},
            ],
            "parameters": {"stable_version": self.predictions.router.stable},
        }

    def infer(
        self,
        model_name: str,
        version: str | None,
        read_body: Callable[[], bytes],
        header_length: str | None,
        *,
        content_encoding: str,
        client: str,
    ) -> tuple[Answers, bytes, dict[str, str]]:
        """Parse a V2 request, answer it with `version` (None: the deployment's choice for
        `client`) and build the response: (answers, body, headers).

        `read_body` is called only once the model and the encoding passed, so an unknown
        model is a 404 whatever the body."""
        self.check_model(model_name, version)
        if content_encoding.strip().lower() != "identity":
            raise UnsupportedMediaType("Send the inference request uncompressed.")
        service = self.predictions
        # Parsing reserves its cost from the worker's decode budget, as image decodes do.
        limits = codec.Limits(
            self.settings.batch_max_files, self.settings.v2_max_pixels_batch, service.limits.budget
        )
        parsed = codec.parse_request(read_body(), header_length, limits)
        if parsed.pixels is not None:
            answers = self._pixels(parsed.pixels, client, version)
        else:
            answers = self._images(list(parsed.images), client, version)
        response, headers = codec.build_response(
            parsed,
            answers.probabilities,
            answers.digits,
            model_version=answers.version,
            prediction_ids=answers.prediction_ids,
        )
        return answers, response, headers

    def _pixels(self, pixels: np.ndarray, client: str, version: str | None) -> Answers:
        model, probabilities, ids = self.predictions.predict_pixels(
            pixels, client=client, version=version
        )
        return Answers(
            model.version,
            model.full_version,
            np.round(np.asarray(probabilities, dtype=np.float64), DECIMALS),
            np.argmax(probabilities, axis=1),
            ids,
        )

    def _images(self, images: list[bytes], client: str, version: str | None) -> Answers:
        results = self.predictions.predict_many(images, client=client, version=version)
        answers = []
        for index, result in enumerate(results):
            if isinstance(result, ServiceError):
                # The protocol has no per-element errors: the first bad image fails the
                # request, with the code /predict would give that image.
                raise type(result)(f"Element {index} of input 'image': {result}", result.headers)
            answers.append(result)
        full = str(answers[0]["model_version"])
        # Answers carry probabilities already rounded to DECIMALS (the cache stores them so).
        return Answers(
            short_version(full),
            full,
            np.array([answer["probabilities"] for answer in answers], dtype=np.float64),
            np.array([answer["prediccion"] for answer in answers], dtype=np.int64),
            [str(answer.get("prediction_id", "")) for answer in answers],
        )
