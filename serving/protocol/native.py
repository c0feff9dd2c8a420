"""The native REST API's handlers: decode the request, call the service, encode the answer.

Routes are declared in ``serving.protocol.endpoints``; each handler takes the request and the
service and returns an ``Answer``, whichever dispatcher (direct or Flask) called it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header
from werkzeug.wsgi import LimitedStream

from serving.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serving.http.answers import Answer, json_answer
from serving.http.encoding import parse_json_object
from serving.http.request import RequestState
from serving.protocol.inputs import (
    CONTRACT,
    IMAGE_TYPES,
    batch_from_data,
    batch_from_image,
    pixel_range_of,
)
from serving.runtime.service import InferenceService
from serving.store.repository import ModelMetadata

MAX_FORM_MEMORY = 500_000  # Flask's defaults for form fields held in memory and the number of parts
MAX_FORM_PARTS = 1000


def metadata(request: RequestState, service: InferenceService) -> Answer:
    """``GET /metadata``: the default model and its input contract."""
    return json_answer(metadata_document(service))


def metadata_document(service: InferenceService) -> dict[str, Any]:
    """The default model's metadata and its input contract, as ``GET /metadata`` serves them."""
    model = service.model()
    meta, raw = model.meta, model.meta.raw
    document: dict[str, Any] = {
        "name": meta.name,
        "version": meta.version,
        "framework": meta.framework,
        "backend": model.backend_name,
        "mode": service.settings.mode,
        "arch": raw.get("arch"),
        "dataset": raw.get("dataset"),
        "accuracy": raw.get("test_accuracy"),
        "created": raw.get("created"),
        "input": {
            "name": meta.input_name,
            "shape": list(meta.input_shape),
            "dtype": meta.input_dtype,
            "range": list(meta.input_range),
            "max_batch": service.settings.max_batch,
            "contract": CONTRACT,
            "content_types": ["application/json", "multipart/form-data", *IMAGE_TYPES],
        },
        "output": {"name": meta.output_name, "shape": [len(meta.labels)], "dtype": "float32"},
        "labels": meta.labels,
    }
    if model.batcher is not None:
        s = service.settings
        document["batching"] = {
            "max_batch_size": s.max_batch_size,
            "max_delay_ms": s.max_delay_ms,
            "max_queue": s.max_queue,
            "request_timeout_ms": s.request_timeout_ms,
        }
    return document


def labels(request: RequestState, service: InferenceService) -> Answer:
    """``GET /label``: the default model's labels."""
    return json_answer({"labels": service.model().meta.labels})


def predict(request: RequestState, service: InferenceService, labels: bool = False) -> Answer:
    """``POST /predict`` (probabilities) or ``/predict/label`` (labels), from the default model
    (the version its traffic rule draws, when it has one)."""
    route = service.route(header=request.header)
    batch, request_id = decode(request, service, route.meta)
    probabilities, model = service.answer(route, batch, request.timeout())
    request.model = model.label
    prediction = model.labels_for(probabilities) if labels else probabilities
    return json_answer({"prediction": prediction, "id": request_id})


def predict_label(request: RequestState, service: InferenceService) -> Answer:
    """``POST /predict/label``: the most probable label per sample."""
    return predict(request, service, labels=True)


def test_label(request: RequestState, service: InferenceService) -> Answer:
    """``GET /predict/test/label``: run the sample stored with the model (a smoke test after
    deploy)."""
    meta = service.model().meta
    data, expected = meta.sample()
    height, width = meta.input_shape
    batch = np.asarray(data, dtype=np.float32).reshape(1, height, width)
    request.batch_size = 1
    label = service.labels_for(service.predict(batch))[0]
    # a TF Serving folder has no labelled sample
    correct = None if expected is None else label == expected
    return json_answer({"prediction": label, "expected": expected, "correct": correct})


def decode(
    request: RequestState, service: InferenceService, meta: ModelMetadata | None = None
) -> tuple[np.ndarray, Any]:
    """The validated batch for ``meta`` (default: the default model's) and the id to answer with
    (the body's ``id`` when it has a plain one)."""
    meta = meta or service.model().meta
    settings = service.settings
    mimetype = request.mimetype
    request_id: Any = request.request_id
    if mimetype == "application/json" or mimetype.endswith("+json"):
        payload = parse_json_object(request.body(service.body_limit))
        if "data" not in payload:
            raise InvalidInput('the JSON object needs a "data" field: {"data": [...]}')
        if isinstance(payload.get("id"), str | int) and not isinstance(payload.get("id"), bool):
            request_id = payload["id"]
        batch = batch_from_data(
            payload["data"], meta, settings.max_batch, pixel_range_of(payload.get("pixel_range"))
        )
    elif mimetype in IMAGE_TYPES or mimetype == "multipart/form-data":
        deadline = request.started + service.timeout_for(request.timeout())
        body = (
            request.body(service.body_limit)
            if mimetype in IMAGE_TYPES
            else _uploaded_file(request, service.body_limit)
        )
        batch = batch_from_image(body, meta, settings.max_image_pixels, deadline)
    # no Content-Type is refused too: a web page cannot send JSON cross-origin without a preflight
    else:
        raise UnsupportedMediaType(
            f"Content-Type {mimetype!r} is not accepted: send application/json, an image"
            " (image/png, image/jpeg) or multipart/form-data with a 'file' field"
        )
    request.batch_size = len(batch)
    return batch, request_id


def _uploaded_file(request: RequestState, limit: int) -> bytes:
    """The bytes of the multipart field ``file``, parsed from the request's stream (any front)."""
    length = request.declared_length(limit)
    if length is not None:
        stream: Any = LimitedStream(request.stream, length)
    elif request.input_terminated:  # chunked: the server ends the stream; stop past the limit
        stream = LimitedStream(request.stream, limit, is_max=True)
    else:
        stream = io.BytesIO()
    mimetype, options = parse_options_header(request.header("Content-Type"))
    parser = FormDataParser(
        max_content_length=limit,
        max_form_memory_size=MAX_FORM_MEMORY,
        max_form_parts=MAX_FORM_PARTS,
    )
    try:
        _stream, _form, files = parser.parse(stream, mimetype, length, options)
    except RequestEntityTooLarge:
        raise PayloadTooLarge(
            f"the multipart body is over the limit of {limit} bytes or parts"
        ) from None
    # werkzeug's ClientDisconnected (a body cut short), the server's chunk errors: the framing's
    except Exception:
        raise BadRequest("the multipart body could not be read: cut short or malformed") from None
    upload = files.get("file")
    if upload is None:
        raise BadRequest("the multipart body needs the image in a field named 'file'")
    try:
        data: bytes = upload.read()
    finally:
        upload.close()
    return data
