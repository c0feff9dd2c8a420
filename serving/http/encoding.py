"""JSON in and out: the one encoder and the one object parser, with no web framework attached.

Every JSON body the server writes goes through ``json_bytes`` (orjson, numpy arrays included), and
every JSON object it reads through ``parse_json_object``, so the v2 codec, the native API and the
error bodies cannot drift apart, and the codec stays usable on its own.
"""

from __future__ import annotations

from typing import Any

import orjson

from serving.errors import BadRequest, InvalidInput

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_bytes(payload: Any) -> bytes:
    """``payload`` as JSON bytes (orjson, numpy arrays included)."""
    return orjson.dumps(payload, option=_OPTIONS)


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
