"""The helpers Flask views use to read requests and send answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from flask import Response, current_app, request

from serving.errors import BadRequest, InvalidInput
from serving.exchange import Answer, current_exchange, json_bytes

if TYPE_CHECKING:
    from serving.service import InferenceService

__all__ = ["current_service", "json_bytes", "json_response", "parse_json_object", "read_body", "respond"]


def current_service() -> InferenceService:
    """The InferenceService of the app serving this request (every blueprint reaches it this way)."""
    service: InferenceService = current_app.extensions["serving"]
    return service


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialize ``payload`` with orjson (numpy arrays included) into a Flask response."""
    return Response(json_bytes(payload), status=status, headers=headers, content_type="application/json")


def respond(answer: Answer) -> Response:
    """A Flask response for an answer built by a dispatcher-neutral handler."""
    status, body, content_type, headers = answer
    return Response(body, status=status, headers=headers, content_type=content_type)


def read_body() -> bytes:
    """The whole request body; 413 when it is over the limit (checked before reading when declared)."""
    return current_exchange().body(request.max_content_length)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse ``body`` as a JSON object: 400 when it is not JSON, 422 when it is not an object."""
    if not body:
        raise BadRequest("the body is empty: send a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object")
    return payload
