"""``Answer``, the one value every handler returns, and ``answer_for_exception``, the one way a failure
becomes an answer.

Both dispatch paths (``serving.dispatch``'s direct routes and Flask's error handler) render errors
with ``answer_for_exception``, so a client gets the same ``{"error": message}`` body, status and
headers whichever path served it.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving.encoding import json_bytes
from serving.errors import ServingError
from serving.observability import metrics
from serving.request import RequestState

log = logging.getLogger("serving")
DRAIN_LIMIT = 16 * 1024 * 1024  # read and drop at most this much of a refused body, so the client sees the 413
JSON = "application/json"


class Answer(NamedTuple):
    """An HTTP answer, independent of any web framework."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] | None = None


def json_answer(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """``payload`` encoded as the JSON body of an answer."""
    return Answer(status, json_bytes(payload), JSON, headers)


def answer_for_exception(error: BaseException, request: RequestState, body_limit: int | None) -> Answer:
    """The JSON answer for any exception a handler or the router raised.

    ``ServingError``: its status, message and headers (refusals counted, 5xx logged). werkzeug's HTTP
    errors (404, 405, a 413 while parsing, a body cut short): their status with our message. Anything
    else: a 500 whose details go to the log with the traceback, never to the client.
    """
    if isinstance(error, ServingError):
        if error.reason is not None:
            metrics.REJECTED.labels(error.reason).inc()
        if error.status_code >= 500:
            log.log(_level(error.status_code, request), "%s %s -> %d: %s", request.method, request.path,
                    error.status_code, error.message)
        if error.status_code == 413:
            drain(request)
        return json_answer({"error": error.message}, error.status_code, error.headers or None)
    if isinstance(error, HTTPException):
        return _http_error_answer(error, request, body_limit)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
    return json_answer({"error": "internal server error"}, 500)


def _level(status: int, request: RequestState) -> int:
    """ERROR for server failures; overload (503/504) is a WARNING, and a client's own deadline is not ours."""
    if status == 504 and request.client_deadline:
        return logging.INFO
    return logging.WARNING if status in (503, 504) else logging.ERROR


def _http_error_answer(error: HTTPException, request: RequestState, body_limit: int | None) -> Answer:
    code = error.code or 500
    if isinstance(error, RequestEntityTooLarge):
        metrics.REJECTED.labels("invalid").inc()
        drain(request)
        message = f"the body is over the limit of {body_limit} bytes"
    elif code == 404:
        message = f"no endpoint at {request.path}"
    elif code == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = error.description or error.name
    allowed = getattr(error, "valid_methods", None)
    headers = {"Allow": ", ".join(allowed)} if code == 405 and allowed else None
    return json_answer({"error": message}, code, headers)


def drain(request: RequestState) -> None:
    """Discard a refused body of bounded size so closing the socket does not reset the connection."""
    remaining = request.content_length() or 0
    if not 0 < remaining <= DRAIN_LIMIT:
        return
    stream = request.environ["wsgi.input"]
    try:
        while remaining > 0:
            chunk = stream.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
    except (OSError, ValueError):
        pass
