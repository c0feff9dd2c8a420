"""``RequestState``: what the server knows about the one HTTP request it is serving, whatever front
brought it.

``RequestState`` is the framework-free part: the id, start time, limits, body rules and deadline,
read through a handful of transport methods (``method``, ``path``, ``query``, ``header``,
``stream``, ``input_terminated``). Each front supplies those:
``serving.fronts.dispatch.WsgiRequest`` reads a WSGI environ (the dispatcher builds one for every
request, whichever way it is then dispatched); ``serving.fronts.asgi.AsgiRequest`` reads an ASGI
scope and the body it received.
The front makes it the current request (``current_request()``), so handlers, error rendering, log
records and the access line all read the same id, start time, limits and deadline. It never imports
a web framework: handlers take it as their first argument.
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
    """One request: its id, start time, the endpoint table that serves it, and what its access line
    reports (the model addressed and the batch size). A front subclasses it with the transport."""

    __slots__ = (
        "request_id",
        "started",
        "endpoints",
        "model",
        "batch_size",
        "admin",
        "client_deadline",
    )

    def __init__(self, endpoints: Sequence[Any] = (), client_id: str | None = None) -> None:
        """``client_id``: the request's ``X-Request-ID`` header, which the front read already."""
        self.started = time.perf_counter()
        self.request_id = sanitize_request_id(client_id)
        #: The routed endpoints (``serving.http.routing.Endpoint``): the API documents list them.
        self.endpoints = endpoints
        # "name:version" when the route addressed a model other than the default
        self.model: str | None = None
        self.batch_size: int | None = None
        self.admin = False  # authenticated with an admin key (serving.http.security.Gate)
        # the deadline came from the client (its 504 is not a server error)
        self.client_deadline = False

    # -- the transport's part -------------------------------------------------------------------
    @property
    def method(self) -> str:
        raise NotImplementedError

    @property
    def path(self) -> str:
        """The path as the client wrote it, decoded as UTF-8."""
        raise NotImplementedError

    @property
    def query(self) -> str:
        """The query string, undecoded ("" when absent)."""
        raise NotImplementedError

    def header(self, name: str) -> str | None:
        """A request header by its HTTP name (``Content-Type`` and ``Content-Length`` included)."""
        raise NotImplementedError

    @property
    def stream(self) -> Any:
        """The body as a file-like object (``read(size)``)."""
        raise NotImplementedError

    @property
    def input_terminated(self) -> bool:
        """Whether the stream ends by itself at the body's end (chunked, decoded by the server)."""
        raise NotImplementedError

    # -- derived from it, the same on every front ------------------------------------------------
    @property
    def mimetype(self) -> str:
        """The Content-Type without parameters, lower case ("" when absent)."""
        return (self.header("Content-Type") or "").partition(";")[0].strip().lower()

    def content_length(self) -> int | None:
        raw = self.header("Content-Length")
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
        stream = self.stream
        if length is not None:
            data: bytes = self._read(stream, length)
            if len(data) < length:
                raise BadRequest(
                    f"the body ended after {len(data)} of its {length} bytes (Content-Length)"
                )
            return data
        # no length, no end marker: nothing safe to read
        if not self.input_terminated:
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
        raw = self.header(TIMEOUT_HEADER)
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
