"""The one JSON encoder and the request-body reader shared by every endpoint."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response, request

from serving.errors import BadRequest, InvalidInput, PayloadTooLarge

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialize ``payload`` with orjson (numpy arrays included) into a Flask response."""
    return Response(orjson.dumps(payload, option=_OPTIONS), status=status, headers=headers,
                    mimetype="application/json")


def read_body() -> bytes:
    """The whole request body; 413 when it is over the limit (checked before reading when declared)."""
    limit = request.max_content_length
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
    return request.get_data(cache=False)


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
