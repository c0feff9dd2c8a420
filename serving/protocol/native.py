"""The native REST API: decode the request, call the service, encode the answer.

    GET  /metadata             model, backend and the input contract
    GET  /label                the label list
    POST /predict              {"data": ...} or an image -> {"prediction": [[p0..p9], ...], "id": ...}
    POST /predict/label        same input -> {"prediction": ["7", ...], "id": ...}
    GET  /predict/test/label   runs the sample stored with the model -> its label (deploy smoke test)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flask import Blueprint, Response
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import parse_form_data

from serving.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serving.exchange import Answer, Exchange, current_exchange, json_bytes
from serving.http import current_service, json_response, parse_json_object, respond
from serving.inputs import IMAGE_TYPES, batch_from_data, batch_from_image
from serving.service import InferenceService

native = Blueprint("native", __name__)
MAX_FORM_MEMORY = 500_000  # Flask's defaults for form fields held in memory and the number of parts
MAX_FORM_PARTS = 1000


@native.get("/metadata")
def metadata() -> Response:
    return json_response(current_service().metadata())


@native.get("/label")
def labels() -> Response:
    return json_response({"labels": current_service().model().meta.labels})


@native.post("/predict")
def predict() -> Response:
    return respond(predict_answer(current_exchange(), current_service(), labels=False))


@native.post("/predict/label")
def predict_label() -> Response:
    return respond(predict_answer(current_exchange(), current_service(), labels=True))


@native.get("/predict/test/label")
def predict_test_label() -> Response:
    service = current_service()
    meta = service.model().meta
    data, expected = meta.sample()
    height, width = meta.input_shape
    batch = np.asarray(data, dtype=np.float32).reshape(1, height, width)
    current_exchange().batch_size = 1
    label = service.labels_for(service.predict(batch))[0]
    return json_response({"prediction": label, "expected": expected, "correct": label == expected})


def predict_answer(exchange: Exchange, service: InferenceService, labels: bool) -> Answer:
    """``POST /predict`` (probabilities) or ``/predict/label`` (labels), whichever dispatcher routed it."""
    batch, request_id = _decode(exchange, service)
    probabilities = service.predict(batch, exchange.timeout())
    prediction = service.labels_for(probabilities) if labels else probabilities
    return 200, json_bytes({"prediction": prediction, "id": request_id}), "application/json", None


def _decode(exchange: Exchange, service: InferenceService) -> tuple[np.ndarray, Any]:
    """The validated batch and the id to answer with (the body's ``id`` when it has a plain one)."""
    meta = service.model().meta
    settings = service.settings
    mimetype = exchange.mimetype
    request_id: Any = exchange.request_id
    if mimetype in ("application/json", "") or mimetype.endswith("+json"):
        payload = parse_json_object(exchange.body(settings.max_body_bytes))
        if "data" not in payload:
            raise InvalidInput('the JSON object needs a "data" field: {"data": [...]}')
        if isinstance(payload.get("id"), str | int) and not isinstance(payload.get("id"), bool):
            request_id = payload["id"]
        batch = batch_from_data(payload["data"], meta, settings.max_batch)
    elif mimetype in IMAGE_TYPES:
        batch = batch_from_image(exchange.body(settings.max_body_bytes), meta, settings.max_image_pixels)
    elif mimetype == "multipart/form-data":
        batch = batch_from_image(_uploaded_file(exchange, settings.max_body_bytes), meta, settings.max_image_pixels)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {mimetype!r} is not accepted: send application/json, an image (image/png,"
            " image/jpeg) or multipart/form-data with a 'file' field"
        )
    exchange.batch_size = len(batch)
    return batch, request_id


def _uploaded_file(exchange: Exchange, limit: int) -> bytes:
    """The bytes of the multipart field ``file``."""
    exchange.declared_length(limit)
    try:
        _stream, _form, files = parse_form_data(
            exchange.environ, max_content_length=limit, max_form_memory_size=MAX_FORM_MEMORY,
            max_form_parts=MAX_FORM_PARTS,
        )
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"the multipart body is over the limit of {limit} bytes or parts") from None
    upload = files.get("file")
    if upload is None:
        raise BadRequest("the multipart body needs the image in a field named 'file'")
    try:
        data: bytes = upload.read()
    finally:
        upload.close()
    return data
