"""A payload record: one inference request and its answer, summarised, redacted and size-capped.

The request thread only captures (``Exchange``: references to the bytes it read and sent and to the
arrays that went into and came out of the model); ``build_record`` runs in the payload writer's
thread. Tensors are summarised wherever they appear (shape, dtype, min, max, mean), in the decoded
model input and output and in a JSON body alike, so a record stays small and holds no raw pixels
unless a thumbnail is asked for; fields and headers named in ``SERVING_PAYLOAD_LOG_REDACT`` (and
credentials, always) are written as ``[redacted]``; a record over ``SERVING_PAYLOAD_LOG_MAX_BYTES``
loses its bodies first, then its thumbnails, keeping the summaries.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

REDACTED = "[redacted]"
#: Headers that are never written as they came.
CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
#: A JSON array of more numbers than this is summarised instead of written out.
INLINE_VALUES = 16
#: Thumbnails are at most this many pixels a side.
THUMBNAIL_SIDE = 32
JSON_TYPES = ("application/json",)
OMITTED = {"omitted": "over SERVING_PAYLOAD_LOG_MAX_BYTES"}


@dataclass(slots=True, eq=False)
class Exchange:
    """What the request thread hands the writer: cheap to make, no copy of a body or an array."""

    request_id: str
    time: float
    method: str
    path: str
    route: str
    status: int
    latency_ms: float
    model: str = ""
    labels: list[str] | None = None
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    request_type: str = ""
    request_length: int = 0
    request_body: bytes | None = None  # None: not captured (an image, or over the cap)
    answer_type: str = ""
    answer_body: bytes | None = None
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    trace_id: str = ""


@dataclass(frozen=True)
class RecordOptions:
    mode: str = "all"  # all, request or response
    max_bytes: int = 16384
    redact: frozenset[str] = frozenset()
    thumbnails: bool = False


def summary(array: Any, thumbnail: bool = False) -> dict[str, Any]:
    """Shape, dtype, min, max and mean of a tensor (and a PNG of its first image when asked)."""
    values = np.asarray(array)
    result: dict[str, Any] = {"shape": list(values.shape), "dtype": str(values.dtype)}
    if values.size and values.dtype.kind in "fiub":
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if finite.size:
            result.update(
                min=float(finite.min()),
                max=float(finite.max()),
                mean=round(float(finite.mean()), 6),
            )
    if thumbnail and values.ndim == 3 and min(values.shape[1:]) >= 8:
        result["thumbnail"] = png_data_uri(values[0])
    return result


def png_data_uri(image: np.ndarray) -> str:
    """A small grayscale PNG of one image, its values stretched to 0-255, as a data: URI."""
    from PIL import Image

    values = np.nan_to_num(np.asarray(image, dtype=np.float32))
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    picture = Image.fromarray(scaled.astype(np.uint8), mode="L")
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def summarise_json(value: Any, redact: frozenset[str]) -> Any:
    """A JSON value with every numeric array of more than ``INLINE_VALUES`` numbers summarised and
    every field named in ``redact`` (lower case) written as ``[redacted]``."""
    if isinstance(value, dict):
        return {
            key: REDACTED if str(key).lower() in redact else summarise_json(item, redact)
            for key, item in value.items()
        }
    if isinstance(value, list):
        if value and _numeric(value):
            try:
                array = np.asarray(value)
            except (ValueError, TypeError):
                array = None
            if array is not None and array.dtype.kind in "fiub":
                return summary(array) if array.size > INLINE_VALUES else value
        return [summarise_json(item, redact) for item in value]
    return value


def _numeric(value: list[Any]) -> bool:
    """Whether a list's first leaf is a number (a tensor), without walking all of it."""
    first: Any = value
    while isinstance(first, list) and first:
        first = first[0]
    return isinstance(first, int | float) and not isinstance(first, bool)


def body_of(content_type: str, length: int, raw: bytes | None, redact: frozenset[str]) -> Any:
    """A body as the record shows it: JSON summarised, anything else by its size."""
    mimetype = content_type.partition(";")[0].strip().lower()
    if raw is None or len(raw) < length:
        return {"bytes": length, "captured": False}
    if mimetype in JSON_TYPES or mimetype.endswith("+json") or (not mimetype and raw[:1] in b"{["):
        try:
            return summarise_json(orjson.loads(raw), redact)
        except orjson.JSONDecodeError:
            return {"bytes": length, "json": False}
    if mimetype.startswith("text/") and length <= 4096:
        return raw.decode("utf-8", "replace")
    return {"bytes": length}


def headers_of(headers: list[tuple[str, str]], redact: frozenset[str]) -> dict[str, str]:
    return {
        name: REDACTED if name in CREDENTIALS or name in redact else value
        for name, value in headers
    }


def build_record(exchange: Exchange, options: RecordOptions) -> dict[str, Any]:
    """The record of one exchange, at most ``options.max_bytes`` once encoded."""
    redact = options.redact
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(exchange.time, tz=UTC).isoformat(timespec="milliseconds"),
        "id": exchange.request_id,
        "model": exchange.model,
        "endpoint": exchange.route,
        "method": exchange.method,
        "path": exchange.path,
        "status": exchange.status,
        "latency_ms": round(exchange.latency_ms, 3),
    }
    if exchange.trace_id:
        record["trace_id"] = exchange.trace_id
    if options.mode in ("all", "request"):
        record["request"] = {
            "content_type": exchange.request_type,
            "bytes": exchange.request_length,
            "headers": headers_of(exchange.request_headers, redact),
            "body": body_of(
                exchange.request_type, exchange.request_length, exchange.request_body, redact
            ),
            "inputs": [summary(batch, options.thumbnails) for batch in exchange.inputs],
        }
    if options.mode in ("all", "response"):
        answer = exchange.answer_body
        outputs = []
        for output in exchange.outputs:
            entry = summary(output)
            if exchange.labels and np.ndim(output) == 2:
                entry["classes"] = [exchange.labels[i] for i in np.argmax(output, axis=1).tolist()]
            outputs.append(entry)
        record["response"] = {
            "content_type": exchange.answer_type,
            "bytes": 0 if answer is None else len(answer),
            "body": body_of(exchange.answer_type, len(answer or b""), answer, redact),
            "outputs": outputs,
        }
    return capped(record, options.max_bytes)


def capped(record: dict[str, Any], limit: int) -> dict[str, Any]:
    """``record`` within ``limit`` bytes: bodies, then thumbnails, then the class lists go."""
    if len(orjson.dumps(record)) <= limit:
        return record
    for side in ("request", "response"):
        if side in record:
            record[side]["body"] = OMITTED
    if len(orjson.dumps(record)) <= limit:
        return record
    for entry in record.get("request", {}).get("inputs", []):
        entry.pop("thumbnail", None)
    for entry in record.get("response", {}).get("outputs", []):
        entry.pop("classes", None)
    if len(orjson.dumps(record)) <= limit:
        return record
    keep = ("time", "id", "model", "endpoint", "method", "path", "status", "latency_ms")
    return {key: record[key] for key in keep if key in record} | {"truncated": True}
