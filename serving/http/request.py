"""``RequestState``: what the server knows about the one HTTP request a thread is serving.

``serving.fronts.dispatch.Dispatcher`` builds one for every request, whichever way it is then
dispatched (the direct routes or Flask), and makes it the thread's current request
(``current_request()``), so handlers, error rendering, log records and the access line all read the
same id, start time, limits and deadline. It never imports a web framework: handlers take it as
their first argument.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any

from serving.errors import BadRequest, PayloadTooLarge
from serving.observability.context import CURRENT_REQUEST

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
MIN_TIMEOUT_MS = 1
MAX_TIMEOUT_MS = 600_000


def sanitize_request_id(candidate: str | None) -> str:
    """The client's id when it is short and plain (<= 128 of [A-Za-z0-9._:/+=-]), else a new one."""
    if candidate and REQUEST_ID_PATTERN.match(candidate):
        return candidate
    return os.urandom(16).hex()


class RequestState:
    """One request: its WSGI environ, id, start time, the endpoint table that serves it, and what
    its access line reports (the model addressed and the batch size)."""

    __slots__ = (
        "environ",
        "request_id",
        "started",
        "endpoints",
        "model",
        "batch_size",
        "admin",
        "client_deadline",
    )

    def __init__(self, environ: dict[str, Any], endpoints: Sequence[Any] = ()) -> None:
        self.environ = environ
        self.started = time.perf_counter()
        self.request_id = sanitize_request_id(environ.get("HTTP_X_REQUEST_ID"))
        #: The routed endpoints (``serving.http.routing.Endpoint``): the API documents list them.
        self.endpoints = endpoints
        # "name:version" when the route addressed a model other than the default
        self.model: str | None = None
        self.batch_size: int | None = None
        self.admin = False  # authenticated with an admin key (serving.http.security.Gate)
        # the deadline came from the client (its 504 is not a server error)
        self.client_deadline = False

    @property
    def method(self) -> str:
        method: str = self.environ.get("REQUEST_METHOD", "-")
        return method

    def header(self, name: str) -> str | None:
        """A request header by its HTTP name (``Content-Type`` and ``Content-Length`` included)."""
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            return self.environ.get(key)
        value: str | None = self.environ.get("HTTP_" + key)
        return value

    @property
    def mimetype(self) -> str:
        """The Content-Type without parameters, lower case ("" when absent)."""
        return str(self.environ.get("CONTENT_TYPE", "")).partition(";")[0].strip().lower()

    @property
    def path(self) -> str:
        """The path as the client wrote it (WSGI hands it over as latin-1; decoded as UTF-8
        here)."""
        path: str = self.environ.get("PATH_INFO", "") or "/"
        return path if path.isascii() else path.encode("latin-1").decode("utf-8", "replace")

    def content_length(self) -> int | None:
        raw = self.environ.get("CONTENT_LENGTH")
        return int(raw) if raw and raw.isascii() and raw.isdigit() else None

    def declared_length(self, limit: int | None) -> int | None:
        """The Content-Length (None when chunked); 413 before anything is read when it is over
        ``limit``."""
        length = self.content_length()
        if length is not None and limit is not None and length > limit:
            raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}")
        return length

    def body(self, limit: int | None) -> bytes:
        """The whole body; 413 when it is over ``limit`` (checked before reading when declared).

        Bad framing is the client's: a body shorter than its Content-Length (the client stopped
        sending, and the worker's read bound ran out) or a malformed chunked encoding (a chunk size
        that is not hex, a stream cut inside a chunk) is a 400, never served as complete and never
        a 500. The server's reader raises its own exception types for the latter, which this
        framework-free core does not name: any failure of the read is the framing's.
        """
        length = self.declared_length(limit)
        stream = self.environ["wsgi.input"]
        if length is not None:
            data: bytes = self._read(stream, length)
            if len(data) < length:
                raise BadRequest(
                    f"the body ended after {len(data)} of its {length} bytes (Content-Length)"
                )
            return data
        # no length, no end marker: nothing safe to read
        if not self.environ.get("wsgi.input_terminated"):
            return b""
        # chunked: the server ends the stream; read one byte past the limit
        data = self._read(stream, -1 if limit is None else limit + 1)
        if limit is not None and len(data) > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        return data

    @staticmethod
    def _read(stream: Any, size: int) -> bytes:
        try:
            data: bytes = stream.read() if size < 0 else stream.read(size)
        except Exception:  # gunicorn's InvalidChunkSize, NoMoreData, ChunkMissingTerminator, ...
            raise BadRequest(
                "the body's framing is malformed (chunked encoding or length)"
            ) from None
        return data

    def timeout(self) -> float | None:
        """The request's own deadline in seconds from ``X-Request-Timeout-Ms``, or None to use the
        setting.

        The service clamps it to ``SERVING_MAX_CLIENT_TIMEOUT_MS``: a client may ask for less time,
        not more.
        """
        raw = self.environ.get("HTTP_X_REQUEST_TIMEOUT_MS")
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not MIN_TIMEOUT_MS <= value <= MAX_TIMEOUT_MS:  # under 1 ms no model call can make it
            raise BadRequest(
                f"{TIMEOUT_HEADER} must be a number of milliseconds in [{MIN_TIMEOUT_MS}, "
                f"{MAX_TIMEOUT_MS}]"
            )
        self.client_deadline = True
        return value / 1000.0


def current_request() -> RequestState:
    """The request being served by this thread (inside a request only)."""
    request = CURRENT_REQUEST.get()
    if not isinstance(request, RequestState):
        raise RuntimeError("no request is being served by this thread")
    return request
