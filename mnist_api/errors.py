"""Typed errors of the service, one per contract `code`, each carrying its HTTP status.

They are plain exceptions (no Flask import) so the pure modules (preprocessing, model) can
raise them; `mnist_api.http_errors` turns them into the contract's JSON shape.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: an error a client can act on, with a stable `code` and a status."""

    status: int = 500
    code: str = "internal_error"
    message: str = "Something went wrong on our side; it has been logged."

    def __init__(self, message: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message
        self.headers = headers or {}

    def to_dict(self) -> dict[str, str]:
        """The contract's error body."""
        return {"error": self.message, "code": self.code}


class MissingFile(ServiceError):
    status = 400
    code = "missing_file"
    message = "Send an image: a multipart field named 'file' or the raw bytes as the body."


class InvalidImage(ServiceError):
    status = 400
    code = "invalid_image"
    message = "The file could not be read as an image; it may be corrupt or truncated."


class TooManyFiles(ServiceError):
    status = 400
    code = "too_many_files"
    message = "Too many files in one batch."


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
    message = "Send a valid API key in the 'x-api-key' header."


class NotFound(ServiceError):
    status = 404
    code = "not_found"
    message = "There is nothing at this URL; see /docs for the routes."


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"
    message = "This route does not accept that HTTP method; see /docs."


class TaskNotFound(ServiceError):
    status = 404
    code = "task_not_found"
    message = "No task with this id was issued by this service (or it has expired)."


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"
    message = "The request body is larger than the service accepts."


class ImageTooLarge(ServiceError):
    status = 413
    code = "image_too_large"
    message = "The image has more pixels than the service accepts; send a smaller image."


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"
    message = "Send a PNG, JPEG, GIF, WEBP or BMP image."


class BlankImage(ServiceError):
    status = 422
    code = "blank_image"
    message = "The image is blank: no digit could be found in it."


class RateLimited(ServiceError):
    status = 429
    code = "rate_limited"
    message = "Too many requests for this API key; retry after the time in 'Retry-After'."


class NotReady(ServiceError):
    status = 503
    code = "not_ready"
    message = "The model is not loaded yet; retry in a moment."


class QueueFull(ServiceError):
    status = 503
    code = "queue_full"
    message = (
        "Too many uploads are waiting for a worker right now; nothing was queued. Retry after "
        "the time in 'Retry-After'."
    )

    def __init__(self, message: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, {"Retry-After": str(QUEUE_FULL_RETRY_AFTER), **(headers or {})})


# Seconds a client is asked to wait when the async queue's upload budget is full.
QUEUE_FULL_RETRY_AFTER = 30


class TaskFailed(ServiceError):
    """A queued task that ended without an answer (its worker raised, or ran out of time)."""

    status = 500
    code = "task_failed"
    message = "The prediction failed on the worker; send the image again."


class DeadLettered(TaskFailed):
    """A task whose message was delivered too often: each run killed its worker process."""

    code = "dead_lettered"
    message = (
        "The worker processing this image stopped every time it tried; the job was given up. "
        "Check the image, or send another."
    )


class BrokerUnavailable(ServiceError):
    status = 503
    code = "broker_unavailable"
    message = "The job queue is unavailable right now; nothing was queued. Retry shortly."


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"
    message = "This route needs an admin key (one of ADMIN_API_KEYS)."


class ModelNotFound(ServiceError):
    status = 404
    code = "model_not_found"
    message = "No model version with this id is installed; GET /models lists them."


class BrowserModelNotFound(ServiceError):
    status = 404
    code = "browser_model_not_found"
    message = (
        "This model version has no browser variant (or its file does not match its model "
        "card); predict on the server with POST /predict instead."
    )


class InvalidDeployment(ServiceError):
    status = 400
    code = "invalid_deployment"
    message = "This deployment change cannot be applied; nothing was changed."


class InvalidLabel(ServiceError):
    status = 400
    code = "invalid_label"
    message = "Send 'label' as a whole number from 0 to 9."


class InvalidPredictionId(ServiceError):
    status = 400
    code = "invalid_prediction_id"
    message = (
        "Send the 'prediction_id' of the answer you are judging, exactly as this service gave "
        "it to your key (it is missing, altered, expired or was issued to another key)."
    )


class PredictionMismatch(ServiceError):
    status = 400
    code = "prediction_mismatch"
    message = (
        "The image is not the one that prediction_id answered: send the same image you "
        "predicted with that answer."
    )


class InvalidInferenceRequest(ServiceError):
    status = 400
    code = "invalid_inference_request"
    message = "The inference request does not follow the Open Inference Protocol."


class JsonTooDeep(ServiceError):
    status = 400
    code = "json_too_deep"
    message = "The JSON body is nested too deeply."


class JsonTooLarge(ServiceError):
    status = 400
    code = "json_too_large"
    message = "The JSON body holds more values than this route takes."


class DeploymentStoreUnavailable(ServiceError):
    status = 503
    code = "deployment_unavailable"
    message = (
        "The deployment store (the database) is unavailable right now; nothing was changed. "
        "Traffic is still served with the last known deployment; retry shortly."
    )


class FeedbackUnavailable(ServiceError):
    status = 503
    code = "feedback_unavailable"
    message = (
        "The feedback store is unavailable right now; nothing was recorded. Predictions are "
        "not affected. Retry shortly."
    )


class Overloaded(ServiceError):
    status = 503
    code = "server_busy"
    message = (
        "The server is busy decoding other large images; retry after the time in 'Retry-After'."
    )
