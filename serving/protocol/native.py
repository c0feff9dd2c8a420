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
from flask import Blueprint, Response, g, request

from serving.errors import BadRequest, InvalidInput, UnsupportedMediaType
from serving.http import current_service, json_response, read_body, read_json_object, request_timeout
from serving.inputs import IMAGE_TYPES, batch_from_data, batch_from_image
from serving.service import InferenceService

native = Blueprint("native", __name__)



@native.get("/metadata")
def metadata() -> Response:
    return json_response(current_service().metadata())


@native.get("/label")
def labels() -> Response:
    return json_response({"labels": current_service().model().meta.labels})


@native.post("/predict")
def predict() -> Response:
    service = current_service()
    batch, request_id, timeout_s = _decode(service)
    return json_response({"prediction": service.predict(batch, timeout_s), "id": request_id})


@native.post("/predict/label")
def predict_label() -> Response:
    service = current_service()
    batch, request_id, timeout_s = _decode(service)
    return json_response({"prediction": service.labels_for(service.predict(batch, timeout_s)), "id": request_id})


@native.get("/predict/test/label")
def predict_test_label() -> Response:
    service = current_service()
    meta = service.model().meta
    data, expected = meta.sample()
    height, width = meta.input_shape
    batch = np.asarray(data, dtype=np.float32).reshape(1, height, width)
    g.batch_size = 1
    label = service.labels_for(service.predict(batch))[0]
    return json_response({"prediction": label, "expected": expected, "correct": label == expected})


def _decode(service: InferenceService) -> tuple[np.ndarray, Any, float | None]:
    """The validated batch, the id to answer with and the request's own deadline, if it set one."""
    meta = service.model().meta
    settings = service.settings
    mimetype = request.mimetype
    request_id: Any = g.request_id
    if mimetype in ("application/json", "") or mimetype.endswith("+json"):
        payload = read_json_object()
        if "data" not in payload:
            raise InvalidInput('the JSON object needs a "data" field: {"data": [...]}')
        if isinstance(payload.get("id"), str | int) and not isinstance(payload.get("id"), bool):
            request_id = payload["id"]
        batch = batch_from_data(payload["data"], meta, settings.max_batch)
    elif mimetype in IMAGE_TYPES:
        batch = batch_from_image(read_body(), meta, settings.max_image_pixels)
    elif mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise BadRequest("the multipart body needs the image in a field named 'file'")
        batch = batch_from_image(upload.read(), meta, settings.max_image_pixels)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {mimetype!r} is not accepted: send application/json, an image (image/png,"
            " image/jpeg) or multipart/form-data with a 'file' field"
        )
    g.batch_size = len(batch)
    return batch, request_id, request_timeout()
