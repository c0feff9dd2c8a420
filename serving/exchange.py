"""One HTTP request and its answer, independent of Flask: what every endpoint and both dispatchers share.

Requests reach the endpoints two ways: Flask's routing (every endpoint) and ``serving.wsgi``'s direct
routes (the inference POSTs, which skip Flask's per-request machinery). Both go through this module,
so a request id, a body limit, an error body, a metric and an access line mean the same on either
path: ``Exchange`` holds the request's state, ``error_answer`` renders every ``ServingError`` and
``finish`` counts the request and writes its access line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving.errors import BadRequest, PayloadTooLarge, ServingError
from serving.observability import metrics
from serving.observability.logging import CURRENT_EXCHANGE, AccessLog, sanitize_request_id

log = logging.getLogger("serving")
DRAIN_LIMIT = 16 * 1024 * 1024  # read and drop at most this much of a refused body, so the client sees the 413
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
MIN_TIMEOUT_MS = 1
MAX_TIMEOUT_MS = 600_000

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY

#: An answer: status, body, content type and extra headers.
Answer = tuple[int, bytes, str, dict[str, str] | None]


class Exchange:
    """The state of one request: its environ, id, start time, and what the access line reports."""

    __slots__ = ("environ", "request_id", "started", "model", "batch_size")

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.started = time.perf_counter()
        self.request_id = sanitize_request_id(environ.get("HTTP_X_REQUEST_ID"))
        self.model: str | None = None  # "name:version" when the route addressed a model other than the default
        self.batch_size: int | None = None

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
        """The path as the client wrote it (WSGI hands it over as latin-1; decoded as UTF-8 here)."""
        path: str = self.environ.get("PATH_INFO", "") or "/"
        return path if path.isascii() else path.encode("latin-1").decode("utf-8", "replace")

    def content_length(self) -> int | None:
        raw = self.environ.get("CONTENT_LENGTH")
        return int(raw) if raw and raw.isascii() and raw.isdigit() else None

    def declared_length(self, limit: int | None) -> int | None:
        """The Content-Length (None when chunked); 413 before anything is read when it is over ``limit``."""
        length = self.content_length()
        if length is not None and limit is not None and length > limit:
            raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}")
        return length

    def body(self, limit: int | None) -> bytes:
        """The whole body; 413 when it is over ``limit`` (checked before reading when declared)."""
        length = self.declared_length(limit)
        if length is not None:
            data: bytes = self.environ["wsgi.input"].read(length)
            return data
        if not self.environ.get("wsgi.input_terminated"):  # no length, no end marker: nothing safe to read
            return b""
        stream = self.environ["wsgi.input"]  # chunked: the server ends the stream; read one byte past the limit
        data = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        return data

    def timeout(self) -> float | None:
        """The request's own deadline in seconds from ``X-Request-Timeout-Ms``, or None to use the setting."""
        raw = self.environ.get("HTTP_X_REQUEST_TIMEOUT_MS")
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not MIN_TIMEOUT_MS <= value <= MAX_TIMEOUT_MS:  # under 1 ms no model call can make it
            raise BadRequest(
                f"{TIMEOUT_HEADER} must be a number of milliseconds in [{MIN_TIMEOUT_MS}, {MAX_TIMEOUT_MS}]"
            )
        return value / 1000.0


def json_bytes(payload: Any) -> bytes:
    """``payload`` as JSON bytes (orjson, numpy arrays included): the one encoder."""
    return orjson.dumps(payload, option=_JSON_OPTIONS)


def current_exchange() -> Exchange:
    """The exchange being served by this thread (inside a request only)."""
    exchange = CURRENT_EXCHANGE.get()
    if exchange is None:
        raise RuntimeError("no request is being served by this thread")
    return exchange


def error_answer(error: ServingError, exchange: Exchange) -> Answer:
    """The JSON answer for a ``ServingError``; counts refusals and logs server-side failures."""
    if error.reason is not None:
        metrics.REJECTED.labels(error.reason).inc()
    if error.status_code >= 500:
        log.error("%s %s -> %d: %s", exchange.environ.get("REQUEST_METHOD"), exchange.path, error.status_code,
                  error.message)
    if error.status_code == 413:
        drain(exchange)
    return error.status_code, json_bytes({"error": error.message}), "application/json", error.headers or None


def http_error_answer(error: HTTPException, exchange: Exchange, limit: int | None) -> Answer:
    """The JSON answer for one of werkzeug's HTTP errors (404, 405, a 413 while parsing, a body cut short)."""
    code = error.code or 500
    method = exchange.environ.get("REQUEST_METHOD", "-")
    if isinstance(error, RequestEntityTooLarge):
        metrics.REJECTED.labels("invalid").inc()
        drain(exchange)
        message = f"the body is over the limit of {limit} bytes"
    elif code == 404:
        message = f"no endpoint at {exchange.path}"
    elif code == 405:
        message = f"{method} is not allowed on {exchange.path}"
    else:
        message = error.description or error.name
    allowed = getattr(error, "valid_methods", None)
    headers = {"Allow": ", ".join(allowed)} if code == 405 and allowed else None
    return code, json_bytes({"error": message}), "application/json", headers


def unexpected_answer(exchange: Exchange) -> Answer:
    """The 500 for an exception nothing expected: logged with its traceback, never shown to the client."""
    log.exception("unhandled error on %s %s", exchange.environ.get("REQUEST_METHOD"), exchange.path)
    return 500, json_bytes({"error": "internal server error"}), "application/json", None


def drain(exchange: Exchange) -> None:
    """Discard a refused body of bounded size so closing the socket does not reset the connection."""
    remaining = exchange.content_length() or 0
    if not 0 < remaining <= DRAIN_LIMIT:
        return
    stream = exchange.environ["wsgi.input"]
    try:
        while remaining > 0:
            chunk = stream.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
    except (OSError, ValueError):
        pass


def finish(exchange: Exchange, endpoint: str, status: int, default_model: str, access_log: AccessLog) -> None:
    """Count the answered request in the metrics and write its access line."""
    environ = exchange.environ
    method = environ.get("REQUEST_METHOD", "-")
    elapsed = time.perf_counter() - exchange.started
    metrics.observe_request(endpoint, method, status, elapsed)
    access_log.write(exchange.request_id, method, exchange.path, status, elapsed * 1000.0,
                     exchange.model or default_model, exchange.batch_size)
