"""One error root for everything the server answers with a non-2xx status.

Every failure a client can see is a ``ServingError`` carrying its HTTP status; both fronts render
all of them (and the WSGI front Flask's own HTTP errors, translated into these) as ``{"error":
message}``. Anything else that escapes a view is logged with its traceback and answered as a plain
500 without details.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a message safe to show the client and the HTTP status to answer with."""

    status_code = 500
    #: Extra response headers, e.g. Retry-After on 503.
    headers: dict[str, str] = {}
    #: The ``reason`` label of serving_rejected_requests_total; None for errors that are not
    #: refusals.
    reason: str | None = None

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class BadRequest(ServingError):
    """The body could not be parsed (malformed JSON, broken image, bad multipart)."""

    status_code = 400
    reason = "invalid"


class InvalidRequest(ServingError):
    """A request that breaks its protocol: v2 tensors whose name, shape, datatype or binary sizes
    disagree."""

    status_code = 400
    reason = "invalid"


class Unauthorized(ServingError):
    """No valid API key for the endpoint's scope."""

    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="serving"'}
    reason = "unauthorized"


class Forbidden(ServingError):
    """A valid key of the wrong scope (an inference key on an admin endpoint)."""

    status_code = 403
    reason = "unauthorized"


class MisdirectedHost(ServingError):
    """A Host header the server does not answer for (DNS rebinding, a misconfigured proxy)."""

    status_code = 421
    reason = "invalid"


class ModelNotFound(ServingError):
    """No such model or version in the repository."""

    status_code = 404


class NoRoute(ServingError):
    """No endpoint at this path."""

    status_code = 404


class MethodNotAllowed(ServingError):
    """The path exists, but not for this method: the answer's Allow header lists the methods it
    takes."""

    status_code = 405

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.headers = {"Allow": ", ".join(allowed)} if allowed else {}


class PayloadTooLarge(ServingError):
    """The body is larger than ``SERVING_MAX_BODY_BYTES``."""

    status_code = 413
    reason = "invalid"


class UnsupportedMediaType(ServingError):
    """The Content-Type is not one the endpoint accepts."""

    status_code = 415
    reason = "invalid"


class InvalidInput(ServingError):
    """Well-formed but unusable input: wrong shape, NaN, out of range, empty or oversized batch."""

    status_code = 422
    reason = "invalid"


class ModelNotReady(ServingError):
    """This worker has not finished loading its model, or it was unloaded a moment ago: retry
    shortly."""

    status_code = 503
    headers = {"Retry-After": "1"}


class QueueFull(ServingError):
    """The batching queue is full: retry shortly (answered at once, never after waiting)."""

    status_code = 503
    headers = {"Retry-After": "1"}
    reason = "queue_full"


class ServiceStopping(ServingError):
    """The worker is shutting down and accepts no new inference."""

    status_code = 503
    headers = {"Retry-After": "1"}
    reason = "stopping"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before the model answered it."""

    status_code = 504
    reason = "deadline"


class PoolUnavailable(ServingError):
    """No model pool process could answer (one is restarting, or all are busy): retry shortly."""

    status_code = 503
    headers = {"Retry-After": "1"}
    reason = "pool"


class InferenceError(ServingError):
    """The model failed on valid input; the message is generic, the details go to the log."""

    status_code = 500


class ModelLoadError(Exception):
    """A model could not be loaded at start-up (missing, corrupt, tampered). Not an HTTP error."""


class ConfigError(Exception):
    """A setting is invalid; the message says which and how to fix it."""
