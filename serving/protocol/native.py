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
    FEATURES_CONTRACT,
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
    return json_answer(metadata_document(service, request))


def metadata_document(
    service: InferenceService, request: RequestState | None = None
) -> dict[str, Any]:
    """The default model's metadata and its input contract, as ``GET /metadata`` serves them."""
    model = service.model()
    if request is not None:
        request.model = model.label
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
        "input": input_document(meta, service.settings.max_batch),
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


def input_document(meta: ModelMetadata, max_batch: int) -> dict[str, Any]:
    """A model's input contract: its kind, tensor, range (null: none enforced), for a feature model
    each feature's name and training range, and what may be sent."""
    document: dict[str, Any] = {
        "kind": meta.input_kind,
        "name": meta.input_name,
        "shape": list(meta.input_shape),
        "dtype": meta.input_dtype,
        "range": list(meta.input_range) if meta.bounded else None,
        "max_batch": max_batch,
    }
    if meta.is_image:
        document["contract"] = CONTRACT
        document["content_types"] = ["application/json", "multipart/form-data", *IMAGE_TYPES]
    else:
        document["features"] = [
            {"name": feature.name, "range": None if feature.range is None else list(feature.range)}
            for feature in meta.features
        ]
        document["contract"] = FEATURES_CONTRACT
        document["content_types"] = ["application/json"]
    return document


def labels(request: RequestState, service: InferenceService) -> Answer:
    """``GET /label``: the default model's labels."""
    model = service.model()
    request.model = model.label
    return json_answer({"labels": model.meta.labels})


def predict(request: RequestState, service: InferenceService, labels: bool = False) -> Answer:
    """``POST /predict`` (probabilities) or ``/predict/label`` (labels), from the default model
    (the version its traffic rule draws, when it has one)."""
    route = service.route(header=request.header)
    request.model = route.label
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
    deploy). ``correct`` says whether the answer is the sample's label; it is null, and
    ``expected`` too, when the sample has no known label (a synthetic sample, a TF Serving
    folder), and ``note`` then says how to record one."""
    meta, probabilities, expected = _run_sample(request, service)
    label = service.labels_for(probabilities)[0]
    return json_answer(_sample_answer(meta, label, expected))


def test_probabilities(request: RequestState, service: InferenceService) -> Answer:
    """``GET /predict/test``: the probabilities the model gives the sample stored with it."""
    meta, probabilities, expected = _run_sample(request, service)
    label = service.labels_for(probabilities)[0]
    return json_answer({**_sample_answer(meta, label, expected), "prediction": probabilities[0]})


def _run_sample(
    request: RequestState, service: InferenceService
) -> tuple[ModelMetadata, np.ndarray, str | None]:
    model = service.model()
    request.model = model.label
    meta = model.meta
    data, expected = meta.sample()
    batch = np.asarray(data, dtype=np.float32).reshape(1, *meta.input_shape)
    request.batch_size = 1
    return meta, service.predict(batch, request.timeout()), expected


def _sample_answer(meta: ModelMetadata, label: str, expected: str | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "prediction": label,
        "expected": expected,
        "correct": None if expected is None else label == expected,
    }
    if expected is None:
        answer["note"] = (
            "the stored sample has no known label, so this only shows the model answers;"
            " record a labelled one with serving import --sample FILE --sample-label LABEL"
            if meta.verified
            else "a TF Serving folder has no labelled sample: this ran a blank input; import it"
            " with serving import --sample FILE --sample-label LABEL to record one"
        )
    return answer


def decode(
    request: RequestState, service: InferenceService, meta: ModelMetadata | None = None
) -> tuple[np.ndarray, Any]:
    """The validated batch for ``meta`` (default: the default model's) and the id to answer with
    (the body's ``id`` when it has a plain one)."""
    if meta is None:
        model = service.model()
        request.model = model.label
        meta = model.meta
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
    elif not meta.is_image:
        raise UnsupportedMediaType(
            f"Content-Type {mimetype!r} is not accepted: model {meta.name} takes"
            f' {meta.describe_input()}, sent as application/json {{"data": [[...], ...]}}'
        )
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
