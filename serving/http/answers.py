"""``Answer``, the one value every handler returns, and ``answer_for_exception``, the one way a
failure becomes an answer.

Both dispatch paths (``serving.fronts.dispatch``'s direct routes and Flask's error handler) render
errors with ``answer_for_exception``, so a client gets the same ``{"error": message}`` body, status
and headers whichever path served it.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from serving.errors import ServingError
from serving.http.encoding import json_bytes
from serving.http.request import RequestState
from serving.observability import metrics

log = logging.getLogger("serving")
# read and drop at most this much of a refused body, so the client sees the 413
DRAIN_LIMIT = 16 * 1024 * 1024
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


def answer_for_exception(error: BaseException, request: RequestState) -> Answer:
    """The JSON answer for any exception a handler or the router raised.

    ``ServingError``: its status, message and headers (refusals counted, 5xx logged). Anything else:
    a 500 whose details go to the log with the traceback, never to the client. (The WSGI front turns
    Flask's own HTTP errors into ``ServingError`` first: ``serving.fronts.wsgi``.)
    """
    if isinstance(error, ServingError):
        if error.reason is not None:
            metrics.REJECTED.labels(error.reason).inc()
        if error.status_code >= 500:
            log.log(
                _level(error.status_code, request),
                "%s %s -> %d: %s",
                request.method,
                request.path,
                error.status_code,
                error.message,
            )
        if error.status_code == 413:
            drain(request)
        return json_answer({"error": error.message}, error.status_code, error.headers or None)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
    return json_answer({"error": "internal server error"}, 500)


def _level(status: int, request: RequestState) -> int:
    """ERROR for server failures; overload (503/504) is a WARNING, and a client's own deadline is
    not ours."""
    if status == 504 and request.client_deadline:
        return logging.INFO
    return logging.WARNING if status in (503, 504) else logging.ERROR


def drain(request: RequestState) -> None:
    """Discard a refused body of bounded size so closing the socket does not reset the
    connection."""
    remaining = request.content_length() or 0
    if not 0 < remaining <= DRAIN_LIMIT:
        return
    stream = request.stream
    try:
        while remaining > 0:
            chunk = stream.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
    except (OSError, ValueError):
        pass
