"""The one JSON encoder and the request-body reader shared by every endpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from flask import Response, current_app, request

from serving.errors import BadRequest, InvalidInput, PayloadTooLarge

if TYPE_CHECKING:
    from serving.service import InferenceService

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_bytes(payload: Any) -> bytes:
    """``payload`` as JSON bytes (orjson, numpy arrays included): the one encoder."""
    return orjson.dumps(payload, option=_OPTIONS)


def current_service() -> InferenceService:
    """The InferenceService of the app serving this request (every blueprint reaches it this way)."""
    service: InferenceService = current_app.extensions["serving"]
    return service


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialize ``payload`` with orjson (numpy arrays included) into a Flask response."""
    return Response(json_bytes(payload), status=status, headers=headers, content_type="application/json")


def read_body() -> bytes:
    """The whole request body; 413 when it is over the limit (checked before reading when declared)."""
    req = request._get_current_object()  # type: ignore[attr-defined]
    limit, length = req.max_content_length, req.content_length
    if limit is not None and length is not None and length > limit:
        raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}")
    if length is not None:  # declared and within the limit: read exactly that, skipping werkzeug's wrappers
        body: bytes = req.environ["wsgi.input"].read(length)
        return body
    body = req.get_data(cache=False)  # chunked: werkzeug enforces the limit while reading
    return body


TIMEOUT_HEADER = "X-Request-Timeout-Ms"
MIN_TIMEOUT_MS = 1
MAX_TIMEOUT_MS = 600_000


def request_timeout() -> float | None:
    """The request's own deadline in seconds from ``X-Request-Timeout-Ms``, or None to use the setting."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not MIN_TIMEOUT_MS <= value <= MAX_TIMEOUT_MS:  # under 1 ms no model call can make it
        raise BadRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds in [{MIN_TIMEOUT_MS}, {MAX_TIMEOUT_MS}]")
    return value / 1000.0


def read_json_object() -> dict[str, Any]:
    """Parse the body as a JSON object: 400 when it is not JSON, 422 when it is not an object."""
    body = read_body()
    if not body:
        raise BadRequest("the body is empty: send a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object")
    return payload
